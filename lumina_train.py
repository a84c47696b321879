"""Train all transformer weights of a Lumina Image 2.0 model (sd-scripts' lumina_train.py flags; see --help)."""

from library.cli import run_training

if __name__ == "__main__":
    run_training(family_name="lumina", mode="full")
