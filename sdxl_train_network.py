"""Train a LoRA for an SDXL model (sd-scripts' flags; see --help)."""

from library.cli import run_training

if __name__ == "__main__":
    run_training(family_name="sdxl", mode="network")
