"""Fine-tune a FLUX.1 dev/schnell transformer in full (sd-scripts' flux_train.py flags; see --help)."""

from library.cli import run_training

if __name__ == "__main__":
    run_training(family_name="flux", mode="full")
