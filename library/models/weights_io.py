"""Small helpers every checkpoint module shares: reading and checking weights, casting them for saving.

Owns `read_state_dict` of a single file (.safetensors, or .ckpt/.pt through `torch.load(weights_only=True)`), the
completeness checks after loading (`assert_fully_loaded` for diffusers' single-file loaders, which
leave missing parameters on the meta device; `load_exactly` for `load_state_dict`;
`build_transformer_from_state`, a transformer built on the meta device around given tensors;
`load_single_file_part` through diffusers' `from_single_file` with a written config), `strip_prefix`,
`write_json` for temporary config folders, the layout-conversion helpers `TransformerFileLayout` (which layout a
transformer file is in), `pop_required`, `block_indices` and `swap_halves`,
and `cast_tensor` / `cpu_state_dict`, which move weights to the CPU and cast floating-point tensors only
(integer buffers keep their dtype).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

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


def from_single_file_with_config(model_class, state: dict, config: dict, config_dir: str, subfolder: str):
    """One part of a single-file checkpoint through diffusers' `from_single_file`, its `config` written to
    `config_dir/subfolder/config.json` first (nothing read from the hub)."""
    write_json(os.path.join(config_dir, subfolder, "config.json"), config)
    return model_class.from_single_file(state, config=config_dir, subfolder=subfolder, local_files_only=True)


def load_single_file_part(model_class, state: dict, config: dict, config_dir: str, subfolder: str, what: str,
                          source: str):
    """`from_single_file_with_config`, checked complete (`what` names the part in the error)."""
    model = from_single_file_with_config(model_class, state, config, config_dir, subfolder)
    assert_fully_loaded(model, what, source)
    return model


def load_exactly(model, state: dict, source: str, assign: bool = False) -> None:
    """load_state_dict that names the first missing or unexpected tensor (position ids aside);
    `source` starts the message ("--clip_l clip_l.safetensors")."""
    result = model.load_state_dict(owning_tensors(state) if assign else state, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        raise UserError(f"{source}: {'missing' if missing else 'unexpected'} tensor {name}; "
                        "the file is incomplete or another model")


def build_transformer_from_state(model_class, config: dict, state: dict, dtype, source: str, model_name: str):
    """`model_class` from `config` (its `_class_name` aside) holding `state`'s tensors, floating-point ones cast to
    `dtype` (None keeps theirs); built on the meta device, so no second copy. A missing or unexpected tensor ->
    UserError naming it and `model_name` ("FLUX.1 transformer")."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class.from_config({k: v for k, v in config.items() if k != "_class_name"})
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise UserError(f"{source}: {'missing' if missing else 'unexpected'} transformer tensor {name}; "
                        f"the file is incomplete or not a {model_name}")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(owning_tensors(state), assign=True)
    return model


def owning_tensors(state: dict) -> dict:
    """`state` with views (q, k, v split from a fused tensor) copied into their own storage before they become
    parameters: views share their base's version counter, so an in-place update of one (an optimizer step
    inside backward) would look to autograd like a change of its siblings. Other tensors are not copied."""
    return {k: (v.clone() if v._base is not None else v) for k, v in state.items()}


@dataclass(frozen=True)
class TransformerFileLayout:
    """How one family's transformer single files name their tensors: the original layout (optionally under
    `prefix`, marked by `original_key`, renamed by `to_diffusers(state, source)`) or diffusers' (`diffusers_key`)."""

    model_name: str  # "FLUX.1 transformer"
    prefix: str
    original_key: str
    diffusers_key: str
    to_diffusers: Callable
    markers: str  # what neither layout's marker was, for the error ("img_in / x_embedder weights")

    def diffusers_state(self, state: dict, source: str) -> dict:
        """The file's transformer tensors under diffusers names; neither layout -> UserError."""
        state = strip_prefix(state, (self.prefix,))
        if self.original_key in state:
            return self.to_diffusers(state, source)
        if self.diffusers_key in state:
            return state
        raise UserError(f"{source} does not look like a {self.model_name} (no {self.markers})")


def pop_required(state: dict, key: str, source: str, what: str):
    """`state.pop(key)`; a missing key -> UserError: `source` is missing the `what` tensor `key`."""
    if key not in state:
        raise UserError(f"{source} is missing the {what} tensor {key}; the file is incomplete")
    return state.pop(key)


def block_indices(keys, prefix: str, within: str = "") -> list[int]:
    """The block numbers N of keys `prefix.N.within...` ("layers" -> [0, 1, ...]), sorted."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.{re.escape(within)}")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def swap_halves(tensor):
    """The two halves of dim 0 exchanged: (shift, scale) rows <-> (scale, shift), as layouts disagree on adaLN."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


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
