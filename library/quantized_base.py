"""Frozen base weights stored in fp8, int8 or nf4 (`--fp8_base`, `--base_weights_dtype`, `--text_encoder_weights_dtype`).

A `StorageFormat` turns a Linear's weight into integer-typed storage tensors and back: fp8 is float8_e4m3fn
(sd-scripts' --fp8_base, a plain cast), int8 is absmax per output row (bitsandbytes' int8_vectorwise_quant,
LLM.int8's weight format) and nf4 is 4-bit NormalFloat in blocks of 64 with one fp32 absmax per block
(bitsandbytes' quantize_4bit, QLoRA's format). `quantize_linears` turns every Linear of a model, except the
paths a family keeps in full precision, into a `QuantizedLinear` in place (same object: LoRA hooks already on it
stay): an nn.Linear whose weight lives only as that storage and is dequantized into the compute dtype (the
autocast dtype, else the input's) inside each call. Its autograd function saves the storage, never the dequantized weight, and dequantizes again
in backward: frozen weights get no gradient, the input does (LoRA's gradients flow through it).
Storage tensors are integer-typed parameters (fp8 and fp32 scales viewed as uint8/int32), so a model's
`.to(dtype)` never casts them, diffusers/transformers' `model.dtype` does not see them, and block swap
(library/offload.py) moves them like any parameter. Dequantizing works on CPU for every format (bitsandbytes'
CPU paths), so tests run there; on CUDA the same calls use bitsandbytes' kernels. Nothing here is written to
checkpoints or LoRA files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

NF4_BLOCK_SIZE = 64


class StorageFormat:
    """How one kind of storage quantizes and dequantizes a 2-D weight."""

    name: str
    bits_per_weight: float  # storage bits per weight, per-block scales included (int8's one fp32 per row is not)
    max_relative_error: float  # a bound on ||W - dequantize(quantize(W))|| / ||W|| for Gaussian-like weights

    def quantize(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """Integer-typed storage tensors for `weight` (out_features, in_features)."""
        raise NotImplementedError

    def dequantize(self, parts: Sequence[torch.Tensor], shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


class Fp8Storage(StorageFormat):
    """float8_e4m3fn, a plain cast as sd-scripts' --fp8_base does (3 mantissa bits: relative step 2^-4)."""

    name, bits_per_weight, max_relative_error = "fp8", 8.0, 0.04

    def quantize(self, weight):
        return [weight.to(torch.float8_e4m3fn).view(torch.uint8)]

    def dequantize(self, parts, shape, dtype):
        return parts[0].view(torch.float8_e4m3fn).to(dtype)


class Int8Storage(StorageFormat):
    """int8 with one absmax per output row (bitsandbytes' vectorwise format): step absmax / 127 per row."""

    name, bits_per_weight, max_relative_error = "int8", 8.0, 0.02

    def quantize(self, weight):
        import bitsandbytes.functional as bnb

        # bitsandbytes' CUDA kernel takes only fp16 (which holds bf16/fp8 weights exactly, |w| < 65504) and
        # scales in fp32; its CPU path computes in the input's dtype, so it gets fp32
        source = weight.to(torch.float16 if weight.device.type == "cuda" else torch.float32).contiguous()
        values, row_absmax, _ = bnb.int8_vectorwise_quant(source)
        return [values, row_absmax.float().view(torch.int32)]

    def dequantize(self, parts, shape, dtype):
        import bitsandbytes.functional as bnb

        return bnb.int8_vectorwise_dequant(parts[0], parts[1].view(torch.float32)).to(dtype)


class Nf4Storage(StorageFormat):
    """4-bit NormalFloat, blocks of 64 weights with an fp32 absmax each (4.5 bits per weight)."""

    name, bits_per_weight, max_relative_error = "nf4", 4.0 + 32 / NF4_BLOCK_SIZE, 0.12

    def quantize(self, weight):
        import bitsandbytes.functional as bnb

        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # an fp8 checkpoint's weight
            weight = weight.float()
        packed, state = bnb.quantize_4bit(weight, blocksize=NF4_BLOCK_SIZE, quant_type="nf4")
        return [packed, state.absmax.float().view(torch.int32)]

    def dequantize(self, parts, shape, dtype):
        import bitsandbytes.functional as bnb

        packed, absmax = parts
        state = bnb.QuantState(absmax.view(torch.float32), shape=torch.Size(shape),
                               code=bnb.get_4bit_type("nf4", device=packed.device), blocksize=NF4_BLOCK_SIZE,
                               quant_type="nf4", dtype=dtype)
        return bnb.dequantize_4bit(packed, state)


FORMATS = {f.name: f for f in (Fp8Storage(), Int8Storage(), Nf4Storage())}


def storage_format(name: str) -> StorageFormat:
    return FORMATS[name]


class _DequantizedLinearFunction(torch.autograd.Function):
    """y = x @ dequantize(storage).T + bias; saves the storage (not the dequantized weight) for backward."""

    @staticmethod
    def forward(ctx, x, layer, bias, *parts):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight = layer.storage.dequantize(parts, layer.weight_shape, dtype)
        ctx.layer = layer
        ctx.save_for_backward(*parts)
        return nn.functional.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_output):
        parts = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.storage.dequantize(parts, ctx.layer.weight_shape, grad_output.dtype)
            grad_input = grad_output @ weight
        return (grad_input, None, None, *(None for _ in parts))


class QuantizedLinear(nn.Linear):
    """A frozen Linear whose weight exists only as `storage`-format tensors (parameters `weight_q0`, ...).

    Made in place from an nn.Linear (`QuantizedLinear.convert`): the layer object stays the same, so forward
    hooks already on it (LoRA) and references to it keep working. `weight` is None (code that inspects
    `layer.weight` to pick a cast, like transformers' T5, skips it); `dequantized_weight()` reads it. The bias
    stays a floating-point parameter cast with the model."""

    storage: StorageFormat
    weight_shape: tuple
    part_names: list

    @classmethod
    def convert(cls, linear: nn.Linear, storage: StorageFormat, device=None) -> "QuantizedLinear":
        """Quantize `linear` in place (on `device` when given, the storage then returned to the layer's device)."""
        weight = linear.weight.detach()
        home = weight.device
        parts = storage.quantize(weight if device is None else weight.to(device))
        linear.__class__ = cls
        linear.storage, linear.weight_shape = storage, tuple(weight.shape)
        linear.part_names = [f"weight_q{i}" for i in range(len(parts))]
        del linear.weight
        for name, part in zip(linear.part_names, parts):
            linear.register_parameter(name, nn.Parameter(part.to(home), requires_grad=False))
        linear.register_parameter("weight", None)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        return linear

    def parts(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.part_names]

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        with torch.no_grad():
            return self.storage.dequantize(self.parts(), self.weight_shape, dtype)

    def storage_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinearFunction.apply(input, self, self.bias, *self.parts())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage={self.storage.name}"


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize_linears` did: layers converted, bytes their weights took before and take now."""

    layers: int
    bytes_before: int
    bytes_after: int


def quantize_linears(root: nn.Module, storage: str, keep: Sequence[str] = (), device=None) -> QuantizeReport:
    """Convert every nn.Linear under `root` whose path matches no `keep` regex into a QuantizedLinear in format
    `storage`, in place. With `device` each weight is quantized there (e.g. on the GPU, fast) and its storage
    goes back to where the layer was. Layers already quantized are left alone."""
    fmt = storage_format(storage)
    patterns = [re.compile(p) for p in keep]
    layers, before, after = 0, 0, 0
    for path, layer in list(root.named_modules()):
        if type(layer) is not nn.Linear or any(p.search(path) for p in patterns):
            continue
        before += layer.weight.numel() * layer.weight.element_size()
        after += QuantizedLinear.convert(layer, fmt, device).storage_bytes()
        layers += 1
    logger.info("%s base weights: %d Linear layers, %.3f GB -> %.3f GB", storage, layers, before / 1e9, after / 1e9)
    return QuantizeReport(layers, before, after)


def quantized_layers(root: nn.Module) -> list[QuantizedLinear]:
    return [m for m in root.modules() if isinstance(m, QuantizedLinear)]


def frozen_weight_bytes(root: nn.Module) -> int:
    """Bytes of every parameter and buffer of `root` (distinct storages counted once)."""
    seen, total = set(), 0
    for tensor in [*root.parameters(), *root.buffers()]:
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total
