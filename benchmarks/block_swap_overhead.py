"""Bookkeeping cost of block swapping (`--blocks_to_swap`) per training step, on CPU.

A FLUX transformer (diffusers' FluxTransformer2DModel, FLUX's module layout at a small width, more
blocks than the test model) with a frozen base and a LoRA on FLUX's targets trains forward + backward +
AdamW for N steps twice: as it is, and with `enable_block_swap` (library/offload.py, FLUX's block_swap_groups) through
`NoCopyBackend`, a transfer backend whose moves copy nothing (a block's "device buffers" are host
masters taken from the swapper's pool). So the difference between the two is the pure cost of the
swapper's hooks, schedule, buffer pool and saved-weight references, without any transfer; on a GPU
the transfers themselves overlap with compute on a side stream. `--full` measures full fine-tuning
(`trains_weights`: gradients follow their block) instead of a LoRA. The two models are timed in
alternating rounds and the median step of each is reported, so load from other jobs hits both alike.

Run: python benchmarks/block_swap_overhead.py [--heads 4 --image_tokens 64 --blocks_to_swap 8 --full]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library.offload import TransferBackend  # noqa: E402  (light import: torch is loaded lazily)


class NoCopyBackend(TransferBackend):
    """Moves that copy nothing: masters are the weights themselves and a buffer is whichever master the
    pool hands out (real, finite weights of some block of the same shape), so only bookkeeping remains."""

    device = "cpu"

    def make_master(self, tensor):
        return tensor.detach()

    def allocate(self, like):
        return like

    def upload(self, copies):
        return None

    def download(self, copies):
        return None


def flux_transformer(double: int, single: int, heads: int, head_dim: int, rope_axes: tuple, text_width: int,
                     pooled_width: int, seed: int = 0):
    """FluxTransformer2DModel with FLUX.1's layout (64 packed channels, guidance embedding) at a chosen size."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_width, pooled_projection_dim=pooled_width,
        guidance_embeds=True, axes_dims_rope=rope_axes)


def flux_lora(transformer, rank: int):
    """A LoRA on FluxFamily's targets of `transformer` (frozen), applied; returns the network."""
    from library.families.base import ModelComponents
    from library.families.flux import FluxFamily
    from library.tiny_models.sd import tiny_clip_text_model
    from library.tiny_models.flux import tiny_t5_encoder
    from networks.lora import create_network

    transformer.requires_grad_(False)
    parts = ModelComponents(denoiser=transformer, vae=None, text_encoders=[tiny_clip_text_model(), tiny_t5_encoder()],
                            tokenizers=[None, None], noise_scheduler=None)
    network = create_network(FluxFamily().lora_targets(parts), network_dim=rank, network_alpha=rank,
                             train_text_encoder=False)
    network.apply_to()
    return network


def flux_inputs(batch: int, image_tokens: int, text_tokens: int, text_width: int, pooled_width: int,
                device="cpu", dtype=None):
    """One batch of packed latents and text conditioning for a FluxTransformer2DModel forward."""
    import torch

    generator = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return dict(hidden_states=randn(batch, image_tokens, 64), encoder_hidden_states=randn(batch, text_tokens, text_width),
                pooled_projections=randn(batch, pooled_width), timestep=torch.full((batch,), 0.5, device=device),
                img_ids=torch.zeros(image_tokens, 3, device=device), txt_ids=torch.zeros(text_tokens, 3, device=device),
                guidance=torch.full((batch,), 3.5, device=device), return_dict=False)


def build(args, swap: bool):
    """(transformer, optimizer, swapper or None) for one of the two timed models (same weights)."""
    import torch

    from library.families.flux import FluxFamily
    from library.offload import enable_block_swap

    transformer = flux_transformer(args.double, args.single, args.heads, 16, (4, 6, 6), args.text_width,
                                   args.text_width)
    if args.full:
        trained = list(transformer.parameters())
    else:
        trained = list(flux_lora(transformer, args.rank).parameters())
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    groups = FluxFamily().block_swap_groups(transformer, args.blocks_to_swap)
    swapper = enable_block_swap(transformer, groups, NoCopyBackend(), trains_weights=args.full) if swap else None
    return transformer, torch.optim.AdamW(trained, lr=1e-5), swapper


def train_step(transformer, optimizer, inputs) -> None:
    loss = transformer(**inputs)[0].square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_steps(model, inputs, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model[0], model[1], inputs)
        times.append(time.perf_counter() - start)
    return times


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=6, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=12, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads of 16 channels (width = 16 x heads)")
    parser.add_argument("--text_width", type=int, default=64, help="T5 and pooled CLIP widths")
    parser.add_argument("--image_tokens", type=int, default=32, help="packed latent tokens (a 128x64 image)")
    parser.add_argument("--text_tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--full", action="store_true", help="full fine-tuning (trains_weights) instead of LoRA")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--blocks_to_swap", type=int, default=8,
                        help="split like sd-scripts: N // 2 double and 2 x (N - N // 2) single blocks")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each model")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import torch

    from library.families.flux import flux_swap_split

    args = parse_args(argv)
    double, single = flux_swap_split(args.blocks_to_swap, args.double, args.single)
    plain, swapped = build(args, swap=False), build(args, swap=True)
    inputs = flux_inputs(args.batch, args.image_tokens, args.text_tokens, args.text_width, args.text_width)
    for model in (plain, swapped):  # warm-up: allocator, optimizer state, first-call costs
        timed_steps(model, inputs, 2)
    times = {"plain": [], "swap": []}
    for _ in range(args.rounds):
        times["plain"] += timed_steps(plain, inputs, args.steps)
        times["swap"] += timed_steps(swapped, inputs, args.steps)
    swapper = swapped[2]
    assert swapper.unscheduled_loads == 0, "the swap schedule was left: the figure would not be bookkeeping only"
    plain_ms, swap_ms = (1000 * statistics.median(times[k]) for k in ("plain", "swap"))
    moves = 2 * (double + single)  # swaps per step: forward and backward each move every swapped block once
    print(f"model: {args.double} double + {args.single} single blocks, width {16 * args.heads}, "
          f"{sum(p.numel() for p in plain[0].parameters()) / 1e6:.1f} M parameters, "
          f"{'full fine-tuning' if args.full else f'LoRA rank {args.rank}'}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; batch {args.batch}, "
          f"{args.image_tokens} image + {args.text_tokens} text tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"blocks_to_swap {args.blocks_to_swap}: {double} double + {single} single blocks swapped, "
          f"{moves} evict+load moves per step, transfers stubbed (NoCopyBackend)")
    print(f"median step over {len(times['plain'])} steps: without swap {plain_ms:.2f} ms, with swap {swap_ms:.2f} ms")
    print(f"bookkeeping: {swap_ms - plain_ms:+.2f} ms per step ({(swap_ms - plain_ms) * 1000 / moves:+.1f} us per move), "
          f"ratio {swap_ms / plain_ms:.3f}")


if __name__ == "__main__":
    main()
