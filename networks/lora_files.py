"""kohya-format LoRA files: writing them with sd-scripts' metadata and hashes, reading them back.

A kohya LoRA file holds, per module name, `<name>.lora_down.weight`, `<name>.lora_up.weight` and a
scalar `<name>.alpha`. sd-scripts also stores two hashes in the metadata so that web UIs need not
hash the file when they index it: `sshs_model_hash` (sha256 of the tensor data, i.e. everything
after the safetensors header) and `sshs_legacy_hash` (first 8 hex digits of the sha256 of the
64 KiB at offset 1 MiB). Both are computed, as sd-scripts does, on the file serialised with only
the `ss_*` metadata, so user metadata added later does not change them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

import torch

from library.atomic_io import save_safetensors_atomic
from library.errors import UserError

logger = logging.getLogger(__name__)

LORA_KEY_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of these tensors, as sd-scripts computes them."""
    from safetensors.torch import save

    training_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    serialized = save(tensors, training_metadata)
    header_length = int.from_bytes(serialized[:8], "little")
    model_hash = hashlib.sha256(serialized[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write `tensors` atomically with `metadata` plus the two sshs hashes."""
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"safetensors metadata values must be str; {key!r} is {type(value).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    model_hash, legacy_hash = sshs_hashes(tensors, metadata)
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    save_safetensors_atomic(tensors, path, metadata)


def read_lora_file(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors (or, loaded without unpickling code, .pt/.ckpt) LoRA file."""
    if not os.path.isfile(path):
        raise UserError(f"LoRA file {path} does not exist; check --network_weights")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files raise many different error types
        raise UserError(f"cannot read LoRA file {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a LoRA state dict (expected a mapping of names to tensors)")
    return state


@dataclass
class FileModule:
    """The tensors of one LoRA module as found in a file."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    other_keys: list[str] = field(default_factory=list)


def group_by_module(tensors: dict[str, torch.Tensor], path: str) -> dict[str, FileModule]:
    """Split kohya keys into {module name: FileModule}; UserError for keys of other adapter kinds."""
    modules: dict[str, FileModule] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        module = modules.setdefault(name, FileModule())
        if suffix == "lora_down.weight":
            module.down = tensor
        elif suffix == "lora_up.weight":
            module.up = tensor
        elif suffix == "alpha":
            module.alpha = tensor
        else:
            module.other_keys.append(key)
    foreign = [key for module in modules.values() for key in module.other_keys]
    if foreign:
        raise UserError(
            f"{path} is not a plain LoRA file: {len(foreign)} keys such as `{foreign[0]}` are not "
            f"{', '.join('.' + s for s in LORA_KEY_SUFFIXES)}; continue a LoHa/LoKr file with --network_module "
            "lycoris.kohya --network_args algo=loha|lokr, a DoRA file with --network_args use_dora=True"
        )
    incomplete = [name for name, m in modules.items() if m.down is None or m.up is None]
    if incomplete:
        raise UserError(f"{path}: module `{incomplete[0]}` (and {len(incomplete) - 1} more) lacks lora_down or lora_up")
    return modules


def file_alpha(module: FileModule) -> float:
    """The module's alpha; files without alpha keys (old LoRAs) mean alpha = rank, as in sd-scripts."""
    if module.alpha is None:
        return float(module.down.shape[0])
    return float(module.alpha.float().item())
