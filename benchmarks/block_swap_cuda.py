"""VRAM and step time against `--blocks_to_swap` on a CUDA GPU (run it where one exists).

For each value of --blocks_to_swap (default 0 4 8 16 24 32) a FLUX-width transformer (diffusers'
FluxTransformer2DModel, FLUX.1's 3072 channels = 24 heads of 128 and its 19 double + 38 single blocks
unless shrunk with --double/--single/--heads) with a frozen bf16 base and a LoRA (or --full fine-tuning)
trains a few steps under bf16 autocast, placed like FluxFamily.place_denoiser does: blocks swapped through
`place_with_block_swap` with the `CudaTransferBackend`, the rest of the model on the GPU. Printed per value:
torch.cuda.max_memory_allocated over the timed steps and the median step time (synchronized), or OOM.
The model is built once in CPU memory (FLUX.1 size needs about 24 GB of RAM plus the same again in
pinned masters while swapping) and moved back between values.
Without CUDA it prints one line and exits with status 2.

Run: python benchmarks/block_swap_cuda.py [--swaps 0 8 16] [--double 19 --single 38] [--resolution 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from block_swap_overhead import flux_inputs, flux_lora, flux_transformer, train_step  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, nargs="+", default=[0, 4, 8, 16, 24, 32],
                        help="values of --blocks_to_swap to measure (split like sd-scripts)")
    parser.add_argument("--double", type=int, default=19, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=38, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--heads", type=int, default=24, help="attention heads of 128 channels (FLUX.1: 24)")
    parser.add_argument("--resolution", type=int, default=1024, help="square image size (tokens = (res / 16)^2)")
    parser.add_argument("--text_tokens", type=int, default=512, help="T5 tokens (FLUX.1 dev: 512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--full", action="store_true", help="full fine-tuning (trains_weights) instead of LoRA")
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per value (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda")
    return parser.parse_args(argv)


def place(transformer, network, blocks_to_swap: int, device, trains_weights: bool):
    """Like FluxFamily.place_denoiser: everything on the GPU, or the blocks swapped and the rest on the GPU."""
    from library.families.flux import FluxFamily
    from library.offload import CudaTransferBackend, place_with_block_swap

    if network is not None:
        network.to(device)
    if not blocks_to_swap:
        transformer.to(device)
        return None
    groups = FluxFamily().block_swap_groups(transformer, blocks_to_swap)
    return place_with_block_swap(transformer, groups, CudaTransferBackend(device), trains_weights=trains_weights)


def measure(transformer, network, args, blocks_to_swap: int) -> str:
    import torch

    device = torch.device(args.device)
    swapper = place(transformer, network, blocks_to_swap, device, args.full)
    trained = list(transformer.parameters()) if args.full else list(network.parameters())
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    side = args.resolution // 16
    inputs = flux_inputs(args.batch, side * side, args.text_tokens, 4096, 768, device, torch.bfloat16)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(2):
                train_step(transformer, optimizer, inputs)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                train_step(transformer, optimizer, inputs)
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        saved = swapper.swapped_bytes() / 2**30 if swapper else 0.0
        return (f"blocks_to_swap {blocks_to_swap:3d}: max_memory_allocated {peak:7.2f} GiB, "
                f"step {1000 * statistics.median(times):8.1f} ms (median of {args.steps}), "
                f"swapped weights {saved:.2f} GiB")
    except torch.cuda.OutOfMemoryError:
        return f"blocks_to_swap {blocks_to_swap:3d}: out of memory"
    finally:
        if swapper is not None:
            swapper.remove()
        del optimizer
        transformer.to("cpu")
        transformer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("block_swap_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")
        return 2
    from library.families.flux import flux_swap_split

    for n in args.swaps:  # reject an impossible value before building a 12 B model
        flux_swap_split(n, args.double, args.single)
    torch.set_default_dtype(torch.bfloat16)
    transformer = flux_transformer(args.double, args.single, args.heads, 128, (16, 56, 56), 4096, 768)
    torch.set_default_dtype(torch.float32)
    network = None if args.full else flux_lora(transformer, args.rank)
    if not args.no_gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    print(f"{torch.cuda.get_device_name(args.device)}; {sum(p.numel() for p in transformer.parameters()) / 1e9:.2f} B "
          f"parameters ({args.double} double + {args.single} single blocks, width {128 * args.heads}), "
          f"{'full fine-tuning' if args.full else f'LoRA rank {args.rank}'}, batch {args.batch}, "
          f"{args.resolution}px, {args.text_tokens} text tokens, gradient checkpointing "
          f"{'off' if args.no_gradient_checkpointing else 'on'}", flush=True)
    for n in args.swaps:
        print(measure(transformer, network, args, n), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
