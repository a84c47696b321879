"""Placing models: the dtype a `--mixed_precision`/`--save_precision` name stands for, and moving a
module to a device and dtype without needless casts (diffusers warns on every `.to(dtype)`)."""

from __future__ import annotations

DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16", "float": "float32"}


def torch_dtype(name: str):
    """torch.float16 for "fp16", torch.float32 for "no"/"float", ..."""
    import torch

    return getattr(torch, DTYPES[name])


def move_module(module, device, dtype) -> None:
    """Move to device, and cast only when the dtype really changes (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
