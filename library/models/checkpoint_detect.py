"""Which model family a checkpoint belongs to, from its tensor names alone.

Users pass a FLUX file to the SD script, or an SDXL file to the FLUX script; loading would then fail
deep inside a converter with a shape error. `detect_checkpoint_family(keys)` recognises the layouts
users bring (LDM/SGM single files, BFL FLUX files, SAI SD3 files, Lumina 2 files, and their
diffusers-named equivalents) by the tensor-name markers of the family table
(library/families/table.py), so a loader can stop early with `wrong_family_error`, which names the
script that trains that family. Reading keys never loads tensors (`read_checkpoint_keys`).
"""

from __future__ import annotations

import os
from typing import Iterable

from library.errors import UserError
from library.families.table import checkpoint_kinds

SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def checkpoint_display_name(kind: str) -> str:
    """"Stable Diffusion 2.x" for "sd2", "FLUX.1" for "flux", "unknown" for what is not recognised."""
    return next((k.display_name for _, k in checkpoint_kinds() if k.name == kind), kind)


def detect_checkpoint_family(keys: Iterable[str]) -> str:
    """"sd", "sd2", "sdxl", "flux", "sd3", "lumina" or "unknown", from tensor names."""
    keys = list(keys)
    for _, kind in checkpoint_kinds():
        if any(marker in key for key in keys for marker in kind.markers):
            return kind.name
    return "unknown"


def wrong_family_error(path: str, detected: str, full_finetune: bool = False) -> UserError:
    """The error for a checkpoint of kind `detected` given to a script of another family."""
    owner = next((facts for facts, kind in checkpoint_kinds() if kind.name == detected), None)
    if owner is None:
        return UserError(f"{path} does not look like a checkpoint this script can load (unrecognised tensor names)")
    looks_like = f"{path} looks like a {checkpoint_display_name(detected)} checkpoint"
    if full_finetune and owner.full_script is None:
        return UserError(f"{looks_like}; {owner.display_name} has no full fine-tuning script yet, "
                         f"train a LoRA with {owner.network_script}")
    return UserError(f"{looks_like}; use {owner.full_script if full_finetune else owner.network_script}")


def _unwrap_state_dict(loaded) -> dict:
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise UserError("the checkpoint does not hold a dictionary of tensors")
    return loaded


def load_pickle_state_dict(path: str) -> dict:
    """A .ckpt/.pt state dict through torch.load(weights_only=True); refusals become a UserError."""
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only raises for anything but plain tensors
        raise UserError(
            f"{path} holds more than plain tensors, so it is not loaded (unpickling can run code); convert "
            f"it to .safetensors with a tool you trust and pass that file instead"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({e}); check the file or re-download it") from e
    return _unwrap_state_dict(loaded)


def read_checkpoint_keys(path: str) -> list[str]:
    """Tensor names of a single-file checkpoint without loading safetensors tensors."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"{path} is not a readable safetensors file: {e}") from e
    return list(load_pickle_state_dict(path).keys())


def check_checkpoint_family(
    path: str, keys: Iterable[str], accepted: Iterable[str], full_finetune: bool = False
) -> str:
    """Detected family of `path` if it is one of `accepted` (or unknown); else wrong_family_error."""
    detected = detect_checkpoint_family(keys)
    if detected != "unknown" and detected not in set(accepted):
        raise wrong_family_error(path, detected, full_finetune)
    return detected


def is_single_file_name(name: str) -> bool:
    return name.lower().endswith(SINGLE_FILE_EXTENSIONS)


def looks_like_local_path(name: str) -> bool:
    """True for strings that can only be paths (hub ids are `owner/name` with no extension)."""
    return (
        is_single_file_name(name)
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )
