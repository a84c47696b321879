"""Step time with and without cached text-encoder outputs, on the tiny SDXL model.

Both runs train a UNet-only LoRA (rank 8) at batch 2 on cached latents; one encodes the captions
with both text encoders every step, the other reads the cached conditioning. Per-step times come
from the difference of a long and a short run (benchmarks/timed_runs.py).
Run: python benchmarks/text_encoder_cache_speed.py
"""

import argparse
import logging
import os
import tempfile

from timed_runs import seconds_per_step, timed_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=50)
    options = parser.parse_args()
    logging.disable(logging.INFO)
    from library.demo import write_demo_images
    from library.tiny_models.sdxl import save_tiny_sdxl_pipeline

    with tempfile.TemporaryDirectory() as root:
        model = save_tiny_sdxl_pipeline(os.path.join(root, "model"))
        images = write_demo_images(os.path.join(root, "images"))

        def argv_with(*cache_flags):
            def argv(steps, tag):
                return ["--pretrained_model_name_or_path", model, "--train_data_dir", images, "--resolution", "64",
                        "--output_dir", os.path.join(root, tag + "".join(cache_flags)), "--max_train_steps",
                        str(steps), "--train_batch_size", "2", "--seed", "1", "--cache_latents",
                        "--network_dim", "8", "--network_train_unet_only", *cache_flags]
            return argv

        timed_training("sdxl", argv_with()(2, "warmup"))
        encoding = seconds_per_step("sdxl", argv_with(), options.short, options.long)
        cached = seconds_per_step("sdxl", argv_with("--cache_text_encoder_outputs"), options.short, options.long)
    print(f"step, text encoders every step: {encoding * 1000:7.1f} ms")
    print(f"step, cached outputs:           {cached * 1000:7.1f} ms")
    print(f"cached / encoding:              {cached / encoding:7.2f}")


if __name__ == "__main__":
    main()
