"""Train a LoRA for an SD3 / SD3.5 model (sd-scripts' sd3_train_network.py flags; see --help)."""

from library.cli import run_training

if __name__ == "__main__":
    run_training(family_name="sd3", mode="network")
