"""Fine-tune an SD3 / SD3.5 model's MMDiT (and text encoders) in full (sd-scripts' sd3_train.py flags; see --help)."""

from library.cli import run_training

if __name__ == "__main__":
    run_training(family_name="sd3", mode="full")
