"""Which model family a checkpoint belongs to, from its tensor names alone.

Users pass a FLUX file to the SD script, or an SDXL file to the FLUX script; loading would then fail
deep inside a converter with a shape error. `detect_checkpoint_family(keys)` recognises the layouts
users bring (FACTS.md: LDM/SGM single files, BFL FLUX files, SAI SD3 files, Lumina 2 files, and
their diffusers-named equivalents) so a loader can stop early with `wrong_family_error`, which names
the script that trains that family. Reading keys never loads tensors (`read_checkpoint_keys`).
"""

from __future__ import annotations

import os
from typing import Iterable

from library.errors import UserError

FAMILY_DISPLAY_NAMES = {
    "sd": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL", "flux": "FLUX",
    "sd3": "SD3", "lumina": "Lumina Image 2.0", "unknown": "unknown",
}
# Entry script per family and mode; SD 1.x and 2.x share the sd scripts.
FAMILY_SCRIPTS = {
    "sd": ("sd_train_network.py", "sd_train.py"), "sd2": ("sd_train_network.py", "sd_train.py"),
    "sdxl": ("sdxl_train_network.py", "sdxl_train.py"), "flux": ("flux_train_network.py", "flux_train.py"),
    "sd3": ("sd3_train_network.py", "sd3_train.py"), "lumina": ("lumina_train_network.py", "lumina_train.py"),
}
SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# (family, substrings any of which marks it), checked in this order: the more specific layouts
# first, because SDXL files also hold the `model.diffusion_model.input_blocks` names SD files have.
_FAMILY_MARKERS: list[tuple[str, tuple[str, ...]]] = [
    ("flux", ("double_blocks.0.img_attn", "single_transformer_blocks.0.")),
    ("lumina", ("noise_refiner.", "context_refiner.")),
    ("sd3", ("joint_blocks.0.", "context_embedder.weight")),
    ("sdxl", ("conditioner.embedders.", "diffusion_model.label_emb.0.0.weight", "add_embedding.linear_1")),
    ("sd2", ("cond_stage_model.model.",)),
    ("sd", ("diffusion_model.input_blocks.", "cond_stage_model.transformer.", "first_stage_model.")),
]


def detect_checkpoint_family(keys: Iterable[str]) -> str:
    """"sd", "sd2", "sdxl", "flux", "sd3", "lumina" or "unknown", from tensor names."""
    keys = list(keys)
    for family, markers in _FAMILY_MARKERS:
        if any(marker in key for key in keys for marker in markers):
            return family
    return "unknown"


def wrong_family_error(path: str, detected: str, full_finetune: bool = False) -> UserError:
    """The error for a checkpoint of family `detected` given to a script of another family."""
    name = FAMILY_DISPLAY_NAMES.get(detected, detected)
    if detected not in FAMILY_SCRIPTS:
        return UserError(f"{path} does not look like a checkpoint this script can load (unrecognised tensor names)")
    network_script, full_script = FAMILY_SCRIPTS[detected]
    script = full_script if full_finetune else network_script
    return UserError(f"{path} looks like a {name} checkpoint; use {script}")


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
