"""Train a LoRA for a Stable Diffusion 1.x/2.x model (sd-scripts' flags; see --help)."""

from library.cli import run_training

if __name__ == "__main__":
    run_training(family_name="sd", mode="network")
