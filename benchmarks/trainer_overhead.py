"""Trainer overhead against a bare hand-written loop, and `--help` start-up time.

Both loops train the same tiny SD1.5-layout UNet LoRA (rank 8, UNet only) with AdamW on cached
latents at batch size 2, encoding the captions with the frozen text encoder every step. The
trainer's per-step time is the difference between a long and a short run divided by the extra
steps, so model loading and caching cancel out. Run: python benchmarks/trainer_overhead.py
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from timed_runs import seconds_per_step, timed_training

LORA_FLAGS = ["--network_dim", "8", "--network_alpha", "8", "--network_train_unet_only"]


def bare_loop_seconds_per_step(model: str, steps: int) -> float:
    import torch
    from diffusers import StableDiffusionPipeline

    from library.families.base import LoraTarget
    from networks.lora import create_network

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    unet, te, tokenizer, scheduler = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    for part in (unet, te, pipe.vae):
        part.requires_grad_(False)
    network = create_network([LoraTarget("lora_unet", unet, ("Transformer2DModel",))], network_dim=8,
                             network_alpha=8, train_text_encoder=False)
    network.apply_to()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    latents = torch.randn(2, 4, 8, 8)
    captions = ["a red circle, flat drawing", "a blue square, flat drawing"]

    def one_step():
        ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            states = te(ids).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, states).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        one_step()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return (time.perf_counter() - start) / steps


def help_seconds() -> float:
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sd_train_network.py")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([sys.executable, script, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=60)
    options = parser.parse_args()
    import logging

    logging.disable(logging.INFO)
    from library.demo import write_demo_images, write_demo_model

    with tempfile.TemporaryDirectory() as root:
        model = write_demo_model(os.path.join(root, "model"))
        images = write_demo_images(os.path.join(root, "images"))
        def argv(steps, tag):
            return ["--pretrained_model_name_or_path", model, "--train_data_dir", images, "--resolution", "64",
                    "--output_dir", os.path.join(root, tag), "--max_train_steps", str(steps),
                    "--train_batch_size", "2", "--seed", "1", "--learning_rate", "1e-4", "--cache_latents",
                    "--max_grad_norm", "0", *LORA_FLAGS]

        timed_training("sd", argv(2, "warmup"))
        trainer_step = seconds_per_step("sd", argv, options.short, options.long)
        bare_step = min(bare_loop_seconds_per_step(model, options.long - options.short) for _ in range(2))
    print(f"trainer step:   {trainer_step * 1000:7.1f} ms")
    print(f"bare loop step: {bare_step * 1000:7.1f} ms")
    print(f"overhead:       {(trainer_step / bare_step - 1) * 100:+7.1f} %")
    print(f"--help start-up: {help_seconds():.2f} s")


if __name__ == "__main__":
    main()
