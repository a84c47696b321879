"""LoRA file layouts: recognising a file's layout and family, and converting between layouts exactly.

Three layouts hold the same low-rank pairs under different names:
- "kohya" (sd-scripts, A1111/Forge, ComfyUI): `lora_unet_<path with _>.lora_down.weight`,
  `.lora_up.weight` and a scalar `.alpha` (scale = alpha / rank).
- "diffusers": PEFT keys `unet.<module path>.lora_A.weight` / `.lora_B.weight` (A = down, B = up),
  with each module's rank and alpha in the `lora_adapter_metadata` JSON (peft's LoraConfig
  arguments r, lora_alpha, rank_pattern, alpha_pattern, target_modules per component), which is
  what diffusers' `save_lora_weights` writes and `load_lora_weights` reads.
- "comfy": ComfyUI's generic names, the denoiser's own checkpoint module names
  (`diffusion_model.input_blocks.1.1.proj_in`) and diffusers-style text-encoder names, with kohya's
  tensor suffixes (comfy/lora.py `model_lora_keys_unet`/`model_lora_keys_clip`).
Names come from the family's LoRA file layout (`LoraFileLayout.module_names`), so this module never branches on a
family. Tensors are never changed, only renamed; alphas move between tensors and metadata with
their dtype recorded, so kohya -> diffusers -> kohya is bit-exact. Our own code: no library converts
in every direction (diffusers' converters write alpha = rank).
LyCORIS modules (LoHa `hada_*`, LoKr `lokr_*`, DoRA `dora_scale`; library/lora_deltas.py) are read too and
keep their suffixes in the kohya and comfy layouts; the diffusers layout cannot hold them (UserError).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from library.errors import UserError
from library.families.table import FAMILIES, lora_markers
from library.lora_deltas import SUFFIXES, LoraPair, is_plain_lora, weights_from_parts

if TYPE_CHECKING:
    import torch

LAYOUTS = ("kohya", "diffusers", "comfy")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
ALPHA_DTYPE_KEY = "lora_alpha_dtype"  # ours: dtype of the kohya alpha tensors, for exact round trips
# key suffix -> role: "down"/"up" (both layouts' names of a LoRA pair), else the LyCORIS suffix itself
_ROLE_OF_SUFFIX = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    **{f".{suffix}": suffix for suffix in SUFFIXES if not suffix.startswith("lora_")},
}
_PART_OF_ROLE = {"down": "lora_down.weight", "up": "lora_up.weight"}
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", PEFT_METADATA_KEY, ALPHA_DTYPE_KEY)

@dataclass
class LoraFile:
    """A LoRA file's modules under the names it uses, its layout and its metadata."""

    path: str
    modules: dict[str, LoraPair]
    layout: str
    metadata: dict[str, str]


# ---- reading ---------------------------------------------------------------------------------------

def read_tensors_and_metadata(path: str) -> tuple[dict, dict[str, str]]:
    if not os.path.isfile(path):
        raise UserError(f"LoRA file {path} does not exist")
    if not (path.endswith(".safetensors") or _looks_like_safetensors(path)):
        from networks.lora_files import read_lora_file

        return read_lora_file(path), {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several error types for damaged files
        raise UserError(f"cannot read LoRA file {path}: {e}") from e


def _looks_like_safetensors(path: str) -> bool:
    """A safetensors file starts with its header length and then a JSON object."""
    with open(path, "rb") as f:
        start = f.read(9)
    return len(start) == 9 and start[8:9] == b"{"


def split_key(key: str) -> tuple[str, str]:
    """'name.lora_A.weight' -> ('name', 'down'); UserError-free: unknown suffixes give role ''."""
    for suffix, role in _ROLE_OF_SUFFIX.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return key, ""


def group_pairs(tensors: dict, path: str) -> dict[str, LoraPair]:
    """{module name: LoraPair, LohaWeights or LokrWeights}; UserError for other keys or incomplete modules."""
    parts: dict[str, dict] = {}
    foreign = []
    for key, tensor in tensors.items():
        name, role = split_key(key)
        if not role:
            foreign.append(key)
            continue
        parts.setdefault(name, {})[_PART_OF_ROLE.get(role, role)] = tensor
    if foreign:
        raise UserError(f"{path} is not a LoRA file: {len(foreign)} keys such as `{foreign[0]}` are not "
                        "lora_down/lora_up/alpha, lora_A/lora_B or LyCORIS' hada_*/lokr_*/dora_scale "
                        "(old diffusers attention-processor files are not supported)")
    if not parts:
        raise UserError(f"{path} holds no LoRA weights")
    return {name: weights_from_parts(name, p, path) for name, p in parts.items()}


def detect_layout(tensor_keys) -> str:
    """"kohya", "diffusers", "comfy" or "unknown" from tensor names alone."""
    keys = list(tensor_keys)
    if any(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys):
        return "diffusers"
    names = {split_key(key)[0] for key in keys if split_key(key)[1]}
    if not names:
        return "unknown"
    if all(name.startswith("lora_") and "." not in name for name in names):
        return "kohya"
    return "comfy"


def detect_family(tensor_keys) -> str:
    """"sd", "sdxl", "flux", "sd3", "lumina" or "unknown": which model a LoRA's names belong to."""
    names = {split_key(key)[0] for key in tensor_keys}
    for family, markers in lora_markers():
        if any(name.startswith(markers) for name in names):
            return family
    return "unknown"


def describe_file_kind(tensor_keys) -> str:
    keys = list(tensor_keys)
    return f"a {family_display_name(detect_family(keys))} LoRA in {detect_layout(keys)} layout"


def family_display_name(family: str) -> str:
    """The family table's display name; "unknown" for a LoRA no family's names match."""
    return FAMILIES[family].display_name if family in FAMILIES else family


def read_lora(path: str) -> LoraFile:
    tensors, metadata = read_tensors_and_metadata(path)
    pairs = group_pairs(tensors, path)
    layout = detect_layout(tensors)
    if layout == "diffusers":
        _apply_peft_alphas(pairs, metadata)
    return LoraFile(path, pairs, layout, metadata)


def _peft_pattern(module_path: str) -> str:
    """The name peft matches a module by: no component prefix, and no transformers-4 `text_model.`
    level (transformers 5 flattened CLIP; peft matches patterns as name suffixes, so both work)."""
    return module_path.split(".", 1)[1].removeprefix("text_model.")


def _matches(pattern: str, module_path: str) -> bool:
    return module_path == pattern or module_path.endswith("." + pattern)


def _apply_peft_alphas(pairs: dict[str, LoraPair], metadata: dict[str, str]) -> None:
    """Give PEFT-named pairs their alpha tensors from lora_adapter_metadata (none: alpha = rank)."""
    import torch

    config = json.loads(metadata[PEFT_METADATA_KEY]) if PEFT_METADATA_KEY in metadata else {}
    alpha_dtype = metadata.get(ALPHA_DTYPE_KEY)
    for name, pair in pairs.items():
        if pair.alpha is not None:
            continue
        component, path = name.split(".", 1)
        alpha = config.get(f"{component}.lora_alpha")
        for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            if _matches(pattern, path):
                alpha = value
        dtype = getattr(torch, alpha_dtype) if alpha_dtype else pair.down.dtype
        pair.alpha = torch.tensor(float(pair.rank if alpha is None else alpha), dtype=dtype)


# ---- renaming --------------------------------------------------------------------------------------

class NameTable:
    """The family's layer names in every layout, looked up from any of them, plus its fused modules."""

    def __init__(self, family) -> None:
        layout_of_family = family.lora_file_layout()
        names = layout_of_family.module_names()
        self.by_layout = {layout: {getattr(n, layout): n for n in names} for layout in LAYOUTS}
        self.fused = layout_of_family.fused_module_names()  # kohya -> (comfy name, diffusers members)
        self.fused_by_comfy = {comfy: kohya for kohya, (comfy, _) in self.fused.items()}
        self.member_of = {member: (kohya, index) for kohya, (_, members) in self.fused.items()
                          for index, member in enumerate(members)}

    def lookup(self, name: str):
        for table in self.by_layout.values():
            if name in table:
                return table[name]
        return None


def _not_layers_error(path: str, unknown: list[str], total: int, family, pairs) -> UserError:
    return UserError(f"{path}: {len(unknown)} of {total} modules (e.g. `{unknown[0]}`) are not layers of a "
                     f"{family.display_name} model; the file looks like {describe_file_kind(_keys_of(pairs))}")


def to_kohya(lora: LoraFile, family) -> dict[str, LoraPair]:
    """The file's pairs under kohya names (for the given family); UserError naming unknown modules.
    Separate diffusers layers that kohya files fuse (q, k, v) are fused back without loss."""
    if lora.layout == "kohya":
        return dict(lora.modules)
    table = NameTable(family)
    converted, groups, unknown = {}, {}, []
    for name, pair in lora.modules.items():
        if name in table.fused_by_comfy:
            converted[table.fused_by_comfy[name]] = pair
        elif name in table.member_of:
            kohya, index = table.member_of[name]
            groups.setdefault(kohya, {})[index] = pair
        elif (names := table.lookup(name)) is not None:
            converted[names.kohya] = pair
        else:
            unknown.append(name)
    if unknown:
        raise _not_layers_error(lora.path, unknown, len(lora.modules), family, lora.modules)
    for kohya, members in groups.items():
        converted[kohya] = _fuse(lora.path, kohya, members, table.fused[kohya][1])
    return converted


def _fuse(path: str, kohya: str, members: dict[int, LoraPair], names: tuple[str, ...]) -> LoraPair:
    """One kohya module over sibling layers: a shared down with stacked ups when the file's members
    share their down and alpha (what splitting a kohya module gives), else ranks concatenated."""
    import torch

    missing = [names[i] for i in range(len(names)) if i not in members]
    if missing:
        raise UserError(f"{path}: kohya files hold {', '.join(names)} as one module ({kohya}), but the file has "
                        f"no {', '.join(missing)}; such a LoRA cannot be written in kohya layout")
    pairs = [members[i] for i in range(len(names))]
    first = pairs[0]
    if all(torch.equal(p.down, first.down) and p.alpha_value() == first.alpha_value() for p in pairs):
        return LoraPair(first.down, torch.cat([p.up for p in pairs]), first.alpha)
    rank = sum(p.rank for p in pairs)
    up = torch.zeros(sum(p.up.shape[0] for p in pairs), rank, dtype=torch.float32)
    row = column = 0
    for p in pairs:  # block-diagonal: member i's rows read only member i's down rows
        up[row:row + p.up.shape[0], column:column + p.rank] = p.up.float() * p.scale
        row, column = row + p.up.shape[0], column + p.rank
    dtype = first.up.dtype
    return LoraPair(torch.cat([p.down for p in pairs]), up.to(dtype), torch.tensor(float(rank), dtype=dtype))


def _keys_of(pairs: dict[str, LoraPair]) -> list[str]:
    return [f"{name}.lora_down.weight" for name in pairs]


def _split_fused(pairs: dict[str, LoraPair], table: NameTable, family) -> dict[str, LoraPair]:
    """kohya pairs with each fused module replaced by its diffusers members (shared down, up rows)."""
    split = {}
    for name, pair in pairs.items():
        if name not in table.fused:
            split[name] = pair
            continue
        sizes = family.lora_file_layout().fused_row_sizes(name, pair.down, pair.up)
        start = 0
        for member, size in zip(table.fused[name][1], sizes):
            # copies: safetensors refuses tensors that share memory
            split[member] = LoraPair(pair.down.clone(), pair.up[start:start + size].clone(), pair.alpha)
            start += size
    return split


def from_kohya(pairs: dict[str, LoraPair], layout: str, family, metadata: dict[str, str]) -> tuple[dict, dict]:
    """(tensors, metadata) of a file in `layout` holding these kohya-named pairs."""
    if layout not in LAYOUTS:
        raise UserError(f"--to {layout}: use one of {', '.join(LAYOUTS)}")
    metadata = {k: v for k, v in metadata.items() if k not in _STALE_METADATA}
    if layout == "kohya":
        return _kohya_tensors(pairs), metadata
    table = NameTable(family)
    unknown = [name for name in pairs if name not in table.by_layout["kohya"] and name not in table.fused]
    if unknown:
        raise _not_layers_error("the LoRA", unknown, len(pairs), family, pairs)
    if layout == "comfy":
        renamed = {table.fused[n][0] if n in table.fused else table.by_layout["kohya"][n].comfy: p
                   for n, p in pairs.items()}
        return _kohya_tensors(renamed), metadata
    _require_plain_pairs(pairs)
    renamed = {n if n in table.fused else table.by_layout["kohya"][n].diffusers: p for n, p in pairs.items()}
    renamed = _split_fused(renamed, table, family)  # fused modules keep kohya names until split here
    return _peft_tensors(renamed), {**metadata, **_peft_metadata(renamed)}


def _kohya_tensors(pairs: dict[str, LoraPair]) -> dict:
    return {key: tensor for name, pair in pairs.items() for key, tensor in pair.tensors(name).items()}


def _require_plain_pairs(pairs: dict[str, LoraPair]) -> None:
    other = [(name, pair) for name, pair in pairs.items() if not is_plain_lora(pair)]
    if other:
        raise UserError(f"the diffusers/PEFT LoRA layout holds only plain LoRA pairs, not {other[0][1].label} modules "
                        f"such as {other[0][0]}; convert with --to kohya or --to comfy instead")


def _peft_tensors(pairs: dict[str, LoraPair]) -> dict:
    tensors = {}
    for name, pair in pairs.items():
        tensors[f"{name}.lora_A.weight"] = pair.down
        tensors[f"{name}.lora_B.weight"] = pair.up
    return tensors


def _peft_metadata(pairs: dict[str, LoraPair]) -> dict[str, str]:
    """peft LoraConfig arguments per component: the commonest rank/alpha plus per-module patterns."""
    by_component: dict[str, dict[str, LoraPair]] = {}
    for name, pair in pairs.items():
        component = name.split(".", 1)[0]
        by_component.setdefault(component, {})[_peft_pattern(name)] = pair
    config: dict = {}
    for component, modules in by_component.items():
        rank = Counter(p.rank for p in modules.values()).most_common(1)[0][0]
        alpha = Counter(p.alpha_value() for p in modules.values()).most_common(1)[0][0]
        config[f"{component}.r"] = rank
        config[f"{component}.lora_alpha"] = alpha
        config[f"{component}.rank_pattern"] = {m: p.rank for m, p in modules.items() if p.rank != rank}
        config[f"{component}.alpha_pattern"] = {m: p.alpha_value() for m, p in modules.items()
                                               if p.alpha_value() != alpha}
        config[f"{component}.target_modules"] = sorted(modules)
    alpha_dtypes = {str(p.alpha.dtype).removeprefix("torch.") for p in pairs.values() if p.alpha is not None}
    metadata = {"format": "pt", PEFT_METADATA_KEY: json.dumps(config, sort_keys=True)}
    if len(alpha_dtypes) == 1:
        metadata[ALPHA_DTYPE_KEY] = alpha_dtypes.pop()
    return metadata


# ---- whole files -----------------------------------------------------------------------------------

def write_lora(path: str, tensors: dict, metadata: dict[str, str], layout: str) -> None:
    """Atomic write; kohya files get sd-scripts' sshs hashes, the others only their metadata."""
    from library.atomic_io import save_safetensors_atomic
    from networks.lora_files import save_lora_file

    if layout == "kohya":
        save_lora_file(tensors, path, metadata)
    else:
        save_safetensors_atomic({k: v.contiguous() for k, v in tensors.items()}, path, metadata)


def convert_lora_file(source: str, target: str, layout: str, family) -> LoraFile:
    """Convert `source` to `layout` at `target`; returns what was read."""
    if os.path.abspath(source) == os.path.abspath(target):
        raise UserError(f"the output {target} is the input file; choose another output path")
    lora = read_lora(source)
    tensors, metadata = from_kohya(to_kohya(lora, family), layout, family, lora.metadata)
    write_lora(target, tensors, metadata, layout)
    return lora
