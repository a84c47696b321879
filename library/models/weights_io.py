"""Small helpers every checkpoint module shares: reading and checking weights, casting them for saving.

Owns `read_state_dict` of a single file (.safetensors, or .ckpt/.pt through `torch.load(weights_only=True)`), the
completeness checks after loading (`assert_fully_loaded` for diffusers' single-file loaders, which
leave missing parameters on the meta device; `load_exactly` for `load_state_dict`), `strip_prefix`,
`write_json` for temporary config folders, and `cast_tensor` / `cpu_state_dict`, which move
weights to the CPU and cast floating-point tensors only (integer buffers keep their dtype).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from library.errors import UserError


def read_state_dict(path: str) -> dict:
    """Every tensor of a single-file checkpoint; unreadable files -> UserError."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{path} is not a readable safetensors file: {e}") from e
    from library.models.checkpoint_detect import load_pickle_state_dict

    return load_pickle_state_dict(path)


def assert_fully_loaded(model, what: str, source: str) -> None:
    """from_single_file leaves parameters it found no tensor for on the meta device."""
    missing = [name for name, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise UserError(f"{source} is missing {what} weights ({', '.join(missing[:3])}, ...); the file is incomplete")


def load_exactly(model, state: dict, source: str, assign: bool = False) -> None:
    """load_state_dict that names the first missing or unexpected tensor (position ids aside);
    `source` starts the message ("--clip_l clip_l.safetensors")."""
    result = model.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        raise UserError(f"{source}: {'missing' if missing else 'unexpected'} tensor {name}; "
                        "the file is incomplete or another model")


def strip_prefix(state: dict, prefixes: tuple[str, ...]) -> dict:
    """The tensors under the first of `prefixes` any key starts with, prefix removed; else `state`."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def cast_tensor(tensor, dtype=None):
    """A detached CPU copy; floating-point tensors cast to `dtype` (None keeps theirs)."""
    tensor = tensor.detach().to("cpu")
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def cpu_state_dict(state: dict, dtype: Optional[object] = None) -> dict:
    return {key: cast_tensor(tensor, dtype) for key, tensor in state.items()}
