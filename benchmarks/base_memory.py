"""Frozen-base bytes, peak memory and output error of fp8 / int8 / nf4 storage at the real model sizes.

Models: FLUX.1-dev's transformer, SD3.5 large's MMDiT, Lumina 2's NextDiT, SDXL's UNet, and the large text
encoders T5-XXL (FLUX.1, SD3) and Gemma-2 2B (Lumina 2), each built on the meta device from its published
config (no weights are read). For every storage the training scripts offer (library/quantized_base.py with
the family's full-precision exceptions):

- frozen-base bytes: every Linear the storage converts, quantized for real (random N(0, 0.02) weights) once
  per distinct (out, in) shape and counted as often as the model has it; every other tensor in bf16;
- peak memory: RssAnon (sampled /proc/self/status, as benchmarks/merge_lora_memory.py) while the model's
  largest block is materialized in bf16 and quantized; loading block by block peaks at the quantized
  model plus that; and the CPU time to quantize, extrapolated from the measured shapes;
- error: per converted Linear shape, ||x W_q^T - x W^T|| / ||x W^T|| for x ~ N(0, 1) (64 tokens), against the
  bf16 weights computed in fp32; mean and max over the model's shapes.

Random Gaussian weights have no outliers; real checkpoints' error is larger for int8 (rows with outliers) and
about the same for fp8/nf4. Run: python benchmarks/base_memory.py [--models flux,sdxl] (about 6 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from merge_lora_memory import PeakSampler  # noqa: E402

STORAGES = ("fp8", "int8", "nf4")
TOKENS = 64


def flux_dev():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def sd35_large():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                                 num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                                 qk_norm="rms_norm")


def lumina2():
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26,
                                     num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256,
                                     norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(32, 32, 32),
                                     axes_lens=(300, 512, 512), cap_feat_dim=2304)


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    from library.families.sdxl_lora_names import _sdxl_unet_config

    return UNet2DConditionModel(**_sdxl_unet_config())


def t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def gemma2_2b():
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                    num_attention_heads=8, num_key_value_heads=4, head_dim=256))


# name -> (builder, family whose full-precision exceptions apply (None: a text encoder, all Linears), block lists)
MODELS = {
    "flux": (flux_dev, "flux", ("transformer_blocks", "single_transformer_blocks")),
    "sd35": (sd35_large, "sd3", ("transformer_blocks",)),
    "lumina": (lumina2, "lumina", ("layers", "noise_refiner", "context_refiner")),
    "sdxl": (sdxl_unet, "sdxl", ("down_blocks", "up_blocks")),
    "t5xxl": (t5_xxl, None, ("encoder.block",)),
    "gemma2": (gemma2_2b, None, ("layers",)),
}


def converted_linears(model, family) -> list[tuple[str, object]]:
    """(path, Linear) of the layers the storage converts: every nn.Linear but the family's exceptions."""
    import re

    import torch

    from library.families import get_family

    keep = [re.compile(p) for p in (get_family(family).full_precision_modules if family else ())]
    return [(path, m) for path, m in model.named_modules()
            if type(m) is torch.nn.Linear and not any(p.search(path) for p in keep)]


def quantize_shape(shape: tuple, storage: str) -> dict:
    """Quantize one random bf16 weight of `shape`: storage bytes, output error, seconds."""
    import torch

    from library.quantized_base import QuantizedLinear, storage_format

    out_features, in_features = shape
    generator = torch.Generator().manual_seed(out_features * 7 + in_features)
    layer = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02, generator=generator)
    weight = layer.weight.detach().float()
    start = time.perf_counter()
    QuantizedLinear.convert(layer, storage_format(storage))
    seconds = time.perf_counter() - start
    x = torch.randn(TOKENS, in_features, generator=generator)
    reference = x @ weight.T
    error = ((x @ layer.dequantized_weight(torch.float32).T - reference).norm() / reference.norm()).item()
    return {"bytes": layer.storage_bytes(), "error": error, "seconds": seconds}


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS, so RssAnon starts each measurement from what is in use."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def largest_block(model, block_lists):
    blocks = [b for name in block_lists for b in model.get_submodule(name)]
    return max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))


def block_peak(model, family, block_lists, storage: str) -> float:
    """MiB of RssAnon added while the largest block is materialized in bf16 and its Linears quantized."""
    import copy

    import torch

    from library.quantized_base import quantize_linears

    block = copy.deepcopy(largest_block(model, block_lists)).to(torch.bfloat16)  # still on the meta device
    release_freed_memory()
    with PeakSampler() as sampler:
        block = block.to_empty(device="cpu")
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.02)
        quantize_linears(block, storage)
        del block
    return sampler.added_mib


def measure(name: str) -> dict:
    import torch

    builder, family, block_lists = MODELS[name]
    with torch.device("meta"):
        model = builder()
    linears = converted_linears(model, family)
    converted_ids = {id(m.weight) for _, m in linears}
    other_bytes = 2 * sum(p.numel() for p in model.parameters() if id(p) not in converted_ids)
    counts: dict[tuple, int] = {}
    for _, layer in linears:
        counts[tuple(layer.weight.shape)] = counts.get(tuple(layer.weight.shape), 0) + 1
    linear_params = sum(o * i * n for (o, i), n in counts.items())
    result = {"params": sum(p.numel() for p in model.parameters()), "converted_params": linear_params,
              "bf16_bytes": other_bytes + 2 * linear_params, "largest_block_bf16_bytes":
              2 * sum(p.numel() for p in largest_block(model, block_lists).parameters())}
    for storage in STORAGES:
        shapes = {shape: quantize_shape(shape, storage) for shape in counts}
        stored = sum(shapes[s]["bytes"] * n for s, n in counts.items())
        seconds = sum(shapes[s]["seconds"] * n for s, n in counts.items())
        errors = [shapes[s]["error"] for s in counts]
        result[storage] = {"bytes": other_bytes + stored, "block_peak_mib": block_peak(model, family, block_lists, storage),
                           "cpu_quantize_s": seconds, "mean_error": sum(errors) / len(errors), "max_error": max(errors)}
    return result


def report(name: str, r: dict) -> None:
    gb = 1e9
    print(f"{name}: {r['params'] / 1e9:.2f} B params ({r['converted_params'] / 1e9:.2f} B in converted Linears), "
          f"bf16 {r['bf16_bytes'] / gb:.2f} GB, largest block {r['largest_block_bf16_bytes'] / gb:.2f} GB bf16")
    for storage in STORAGES:
        s = r[storage]
        print(f"  {storage:5s} {s['bytes'] / gb:6.2f} GB ({s['bytes'] / r['bf16_bytes']:.0%} of bf16)  "
              f"block-by-block peak ~{(s['bytes'] + s['block_peak_mib'] * 2**20) / gb:.2f} GB "
              f"(largest block +{s['block_peak_mib']:.0f} MiB)  CPU quantize ~{s['cpu_quantize_s']:.0f} s  "
              f"output error mean {s['mean_error']:.4f} max {s['max_error']:.4f}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    results = {}
    for name in args.models.split(","):
        results[name] = measure(name)
        report(name, results[name])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
