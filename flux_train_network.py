"""Train a LoRA for a FLUX.1 dev/schnell model (sd-scripts' flux_train_network.py flags; see --help)."""

from library.cli import run_training

if __name__ == "__main__":
    run_training(family_name="flux", mode="network")
