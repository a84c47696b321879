"""Train a LoRA on the built-in demo (tiny SD1.5-layout model + drawn shapes); nothing to download.

Usage: python quickstart.py [--output_dir quickstart_output] [--max_train_steps 60]
"""

import argparse
import logging
import os

from library.cli import run_training
from library.demo import write_demo_images, write_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="quickstart_output")
    parser.add_argument("--max_train_steps", type=int, default=60)
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = os.path.abspath(options.output_dir)
    model = write_demo_model(os.path.join(root, "tiny_sd15"))
    images = write_demo_images(os.path.join(root, "images"))
    run_training("sd", "network", [
        "--pretrained_model_name_or_path", model, "--train_data_dir", images, "--resolution", "64",
        "--output_dir", os.path.join(root, "lora"), "--output_name", "demo_lora",
        "--network_dim", "8", "--network_alpha", "8", "--network_args", "conv_dim=4", "conv_alpha=4",
        "--learning_rate", "1e-3", "--max_train_steps", str(options.max_train_steps), "--train_batch_size", "2",
        "--seed", "42", "--cache_latents", "--loss_log_every", "10",
    ])
    path = os.path.join(root, "lora", "demo_lora.safetensors")
    logging.getLogger("quickstart").info("LoRA written to %s", path)
    print(f"\nLoRA file: {path}")


if __name__ == "__main__":
    main()
