"""Baking LoRAs into a checkpoint by streaming it tensor by tensor, and merging LoRAs into one LoRA.

`merge_into_checkpoint` rewrites a single-file checkpoint (in the layout it came in) or a diffusers
folder: every tensor is read on its own, the LoRA deltas that touch it (ratio * alpha / rank * up @
down, on the chosen device in float32) are added, and it is written out in the output dtype, so memory
stays near the largest tensor plus the LoRAs whatever the checkpoint's size (LoHa, LoKr and DoRA
modules add their own delta, `weight_change` in library/lora_deltas.py). Tensors no LoRA touches
and whose dtype stays are copied byte for byte. Which LoRA module changes which tensor comes from the
family's LoRA file layout (`LoraFileLayout.checkpoint_slices`); LoRAs in diffusers or ComfyUI layout are renamed to kohya names
first (library/lora_formats.py). Before anything is written, every module of every LoRA must find
its tensor, else a UserError says how many matched and what the LoRA looks like.

`merge_loras` combines LoRAs into one LoRA: exactly by concatenating ranks (`concat=True`), or by a
truncated SVD of the summed deltas to a new rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from library.atomic_io import atomic_write, replace_folder_atomically
from library.errors import UserError
from library.lora_formats import LoraPair, describe_file_kind, detect_family, is_plain_lora, read_lora, to_kohya
from library.safetensors_stream import (
    DTYPE_OF_PRECISION,
    BufferRing,
    OutputTensor,
    SafetensorsHeader,
    SafetensorsStreamWriter,
    read_header,
    read_tensor,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class MergeLora:
    """One LoRA to merge: kohya-named pairs and its ratio."""

    path: str
    ratio: float
    pairs: dict[str, LoraPair]
    metadata: dict[str, str] = field(default_factory=dict)


def check_paths(inputs: list[str], save_to: str) -> None:
    """Every input exists and the output is none of them."""
    for path in inputs:
        if not os.path.exists(path):
            raise UserError(f"{path}: no such file or folder")
    target = os.path.realpath(save_to)
    for path in inputs:
        if os.path.realpath(path) == target:
            raise UserError(f"the output {save_to} is also an input; write the result to a new path")


def load_loras(paths: list[str], ratios: Optional[list[float]], family) -> list[MergeLora]:
    if not paths:
        raise UserError("--loras: give at least one LoRA file")
    ratios = [1.0] * len(paths) if ratios is None else ratios
    if len(ratios) != len(paths):
        raise UserError(f"--ratios has {len(ratios)} values for {len(paths)} --loras; give one ratio per LoRA")
    loras = []
    for path, ratio in zip(paths, ratios):
        lora = read_lora(path)
        loras.append(MergeLora(path, float(ratio), to_kohya(lora, family), lora.metadata))
    return loras


# ---- deltas ----------------------------------------------------------------------------------------

def lora_delta(pair: LoraPair, device) -> "torch.Tensor":
    """up @ down as a float32 weight-shaped tensor (Linear [out, in] or Conv [out, in, kh, kw])."""
    import torch

    down = pair.down.to(device=device, dtype=torch.float32)
    up = pair.up.to(device=device, dtype=torch.float32)
    if down.dim() == 2 and up.dim() == 2:
        return up @ down
    flat = up.reshape(up.shape[0], -1) @ down.reshape(pair.rank, -1)
    return flat.reshape(up.shape[0], *down.shape[1:])


# ---- merging into a checkpoint ---------------------------------------------------------------------

@dataclass
class WeightFile:
    """One safetensors file of the model: where it is, where it goes, which model part it holds."""

    source: str
    relative: str  # path inside an output folder, or the output file of a separate text-encoder file
    component: str
    header: Optional[SafetensorsHeader] = None
    slices: dict = field(default_factory=dict)  # tensor name -> [LoraWeightSlice]


def _plan_folder(folder: str) -> tuple[list[WeightFile], list[str]]:
    """Weight files (one per safetensors file, component = its subfolder) and other files to copy."""
    weights, others = [], []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            relative = os.path.relpath(os.path.join(root, name), folder)
            if name.endswith(".safetensors"):
                component = relative.split(os.sep)[0] if os.sep in relative else ""
                weights.append(WeightFile(os.path.join(folder, relative), relative, component))
            elif name.endswith((".bin", ".ckpt", ".pt", ".pth")):
                raise UserError(f"{os.path.join(folder, relative)}: only .safetensors weights can be merged; "
                                "save the model with safetensors first")
            else:
                others.append(relative)
    if not weights:
        raise UserError(f"{folder} holds no .safetensors weights; pass a diffusers model folder or a single file")
    return weights, others


def plan_model(model: str) -> tuple[list[WeightFile], list[str]]:
    if os.path.isdir(model):
        weights, others = _plan_folder(model)
    elif model.endswith(".safetensors"):
        weights, others = [WeightFile(model, "", "checkpoint")], []
    else:
        raise UserError(f"--model {model}: merging streams .safetensors files only; convert the checkpoint first")
    for weight_file in weights:
        weight_file.header = read_header(weight_file.source)
    return weights, others


def _attach_slices(family, weights: list[WeightFile]) -> set[str]:
    """Fill each file's tensor -> LoRA slices map; returns every LoRA name the model can take."""
    known = set()
    for weight_file in weights:
        weight_file.slices = family.lora_file_layout().checkpoint_slices(weight_file.header.meta_tensors(),
                                                                         weight_file.component)
        known.update(s.lora_name for slices in weight_file.slices.values() for s in slices)
    return known


def check_coverage(loras: list[MergeLora], known: set[str], family, model: str) -> None:
    for lora in loras:
        unmatched = [name for name in lora.pairs if name not in known]
        if unmatched:
            matched = len(lora.pairs) - len(unmatched)
            hint = ""
            separate = family.lora_file_layout().separate_text_encoder_components
            if separate and all(n.startswith("lora_te") for n in unmatched):
                files = " ".join(separate.values())
                hint = f"; its text-encoder modules need the text-encoder files: --text_encoders {files} (in that " \
                       "order) and --save_text_encoders_to"
            raise UserError(
                f"{lora.path}: only {matched} of {len(lora.pairs)} LoRA modules match the {family.display_name} "
                f"model {model} (e.g. `{unmatched[0]}` has no weight); the file looks like "
                f"{describe_file_kind(f'{n}.lora_down.weight' for n in lora.pairs)}{hint}"
            )


def _output_dtype(info, save_precision: Optional[str]) -> str:
    if save_precision is None or not info.is_float:
        return info.dtype
    return DTYPE_OF_PRECISION[save_precision]


def add_lora_(weight: "torch.Tensor", pair: LoraPair, ratio: float, lora_name: str, tensor_name: str,
              up_rows: Optional[tuple[int, int]] = None) -> None:
    """weight += the module's change at strength `ratio`, in place (weight float32, shaped like the layer).

    `up_rows`: `weight` is only these rows of the module's output (a fused module on a separately stored
    layer). A plain LoRA is added as ratio * scale * up @ down without building more than that product;
    LoHa, LoKr and DoRA modules compute their whole delta (library/lora_deltas.py)."""
    out_rows = pair.out_features if up_rows is None else up_rows[1] - up_rows[0]
    inputs = pair.down[0].numel() if is_plain_lora(pair) else weight[0].numel()
    if weight.shape[0] != out_rows or weight.numel() != out_rows * inputs:
        raise UserError(f"LoRA module {lora_name} makes a {out_rows}x{inputs} update but the checkpoint "
                        f"tensor {tensor_name} is {tuple(weight.shape)}: the LoRA was trained for another model size")
    if is_plain_lora(pair):
        _add_plain_lora_(weight, pair, ratio * pair.scale, up_rows)
        return
    shape = (pair.out_features, *weight.shape[1:])
    try:
        change = pair.weight_change(weight if up_rows is None else None, shape, ratio, lora_name)
    except RuntimeError as e:  # the factors' product does not fit the tensor
        raise UserError(f"{pair.label} module {lora_name} does not fit the checkpoint tensor {tensor_name} "
                        f"{tuple(weight.shape)}: the file was trained for another model size ({e})") from e
    weight.add_(change if up_rows is None else change[up_rows[0]:up_rows[1]])


def _add_plain_lora_(weight, pair: LoraPair, factor: float, up_rows) -> None:
    import torch

    up = pair.up if up_rows is None else pair.up[up_rows[0]:up_rows[1]]
    up = up.to(device=weight.device, dtype=torch.float32)
    down = pair.down.to(device=weight.device, dtype=torch.float32)
    up, down = up.reshape(up.shape[0], pair.rank), down.reshape(pair.rank, -1)
    weight.view(up.shape[0], down.shape[1]).addmm_(up, down, alpha=factor)


class _TensorMerger:
    """Reads, merges and hands one tensor at a time to the writer, reusing a few buffers sized for
    the file's largest tensor (so memory stays flat and no page faults are paid per tensor)."""

    def __init__(self, header: SafetensorsHeader, entries: list[OutputTensor], loras: list[MergeLora], device):
        import torch

        self.loras, self.device = loras, torch.device(device)
        infos = list(header.tensors.values())
        self.read_buffer = BufferRing(max((i.nbytes for i in infos), default=0), count=1)
        self.out_ring = BufferRing(max((e.nbytes for e in entries), default=0))
        numel = max((_numel(i.shape) for i in infos if i.is_float), default=0)
        self.work = torch.empty(numel, dtype=torch.float32, device=self.device)

    def write(self, writer, source, info, entry, slices) -> int:
        """Copy, cast or merge one tensor into the writer; 1 if a LoRA changed it."""
        slices = [s for s in slices if any(s.lora_name in lora.pairs for lora in self.loras)]
        if not slices and entry.dtype == info.dtype:
            writer.copy_tensor(info.name, source, info)
            return 0
        tensor = read_tensor(source, info, into=self.read_buffer.take(info.nbytes))
        if slices:
            tensor = self._merged(tensor, info, slices)
        out = self.out_ring.take_tensor(entry.dtype, entry.shape)
        out.copy_(tensor)
        writer.write_tensor(info.name, out)
        return 1 if slices else 0

    def _merged(self, tensor, info, slices):
        weight = self.work[: tensor.numel()].view(tensor.shape)
        weight.copy_(tensor)
        for lora in self.loras:
            for piece in slices:
                pair = lora.pairs.get(piece.lora_name)
                if pair is not None:
                    target = weight if piece.rows is None else weight[piece.rows[0]:piece.rows[1]]
                    add_lora_(target, pair, lora.ratio, piece.lora_name, info.name, piece.up_rows)
        return weight


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def rewrite_weight_file(weight_file: WeightFile, target: str, loras: list[MergeLora], save_precision: Optional[str],
                        device, metadata: Optional[dict] = None) -> int:
    """Stream `weight_file` to `target` with the LoRAs merged; returns how many tensors changed."""
    header = weight_file.header
    entries = [OutputTensor(i.name, _output_dtype(i, save_precision), i.shape) for i in header.tensors.values()]
    merger = _TensorMerger(header, entries, loras, device)
    changed = 0
    with open(weight_file.source, "rb") as source, open(target, "wb") as out:
        writer = SafetensorsStreamWriter(out, entries, header.metadata if metadata is None else metadata,
                                         background=True)
        try:
            for info, entry in zip(header.tensors.values(), entries):
                changed += merger.write(writer, source, info, entry, weight_file.slices.get(info.name, ()))
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return changed


def _merge_record(loras: list[MergeLora]) -> str:
    return json.dumps([{"file": os.path.basename(l.path), "ratio": l.ratio,
                        "sshs_model_hash": l.metadata.get("sshs_model_hash", "")} for l in loras])


def separate_text_encoder_files(family, sources: list[str], targets: list[str], model: str) -> list[WeightFile]:
    """--text_encoders / --save_text_encoders_to: the family's text encoders kept in files of their own."""
    separate = family.lora_file_layout().separate_text_encoder_components
    components = list(separate)
    if not sources and not targets:
        return []
    if not components:
        raise UserError(f"{family.display_name} checkpoints hold their text encoders; drop --text_encoders")
    if os.path.isdir(model):
        raise UserError(f"{model} is a diffusers folder and holds its text encoders; drop --text_encoders")
    if len(sources) > len(components) or len(sources) != len(targets):
        files = ", ".join(separate.values())
        raise UserError(f"give up to {len(components)} --text_encoders ({files}, in that order) and "
                        f"as many --save_text_encoders_to paths (got {len(sources)} and {len(targets)})")
    files = []
    for source, target, component in zip(sources, targets, components):
        if not source.endswith(".safetensors"):
            raise UserError(f"--text_encoders {source}: merging streams .safetensors files only")
        files.append(WeightFile(source, target, component, read_header(source)))
    return files


def merge_into_checkpoint(family, model: str, loras: list[MergeLora], save_to: str,
                          save_precision: Optional[str] = None, device="cpu",
                          text_encoder_files: Optional[list[WeightFile]] = None) -> int:
    """Bake `loras` into `model` (single file or diffusers folder) at `save_to`, and into separate
    text-encoder files (WeightFile.relative = where each goes); returns how many tensors changed."""
    weights, others = plan_model(model)
    extra = list(text_encoder_files or [])
    check_coverage(loras, _attach_slices(family, weights + extra), family, model)
    if os.path.isdir(model):
        changed = _merge_into_folder(model, weights, others, loras, save_to, save_precision, device)
    else:
        changed = _merge_into_file(weights[0], save_to, loras, save_precision, device,
                                   {**weights[0].header.metadata, "merged_loras": _merge_record(loras)})
    for weight_file in extra:
        changed += _merge_into_file(weight_file, weight_file.relative, loras, save_precision, device,
                                    weight_file.header.metadata)
    return changed


def _merge_into_file(weight_file: WeightFile, target: str, loras, save_precision, device, metadata) -> int:
    changed = []
    atomic_write(target, lambda temp: changed.append(
        rewrite_weight_file(weight_file, temp, loras, save_precision, device, metadata)))
    return changed[0]


def _merge_into_folder(model, weights, others, loras, save_to, save_precision, device) -> int:
    save_to = os.path.abspath(save_to)
    if os.path.isfile(save_to):
        raise UserError(f"--save_to {save_to} is a file; a diffusers model is saved as a folder")
    changed = []

    def write(temp: str) -> None:
        for relative in others:
            os.makedirs(os.path.dirname(os.path.join(temp, relative)), exist_ok=True)
            shutil.copy2(os.path.join(model, relative), os.path.join(temp, relative))
        for weight_file in weights:
            target = os.path.join(temp, weight_file.relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            changed.append(rewrite_weight_file(weight_file, target, loras, save_precision, device))
        _update_shard_indexes(temp)

    replace_folder_atomically(save_to, write)
    return sum(changed)


def _update_shard_indexes(folder: str) -> None:
    """Sharded weights: the index's total_size follows the new dtypes."""
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(".safetensors.index.json"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
            shards = set(index.get("weight_map", {}).values())
            total = sum(_data_size(os.path.join(root, shard)) for shard in shards)
            index.setdefault("metadata", {})["total_size"] = total
            with open(path, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)


def _data_size(path: str) -> int:
    return sum(info.nbytes for info in read_header(path).tensors.values())


# ---- merging LoRAs into one LoRA -------------------------------------------------------------------

def _concat_pair(parts: list[tuple[float, LoraPair]], dtype) -> LoraPair:
    """Exact: rank-concatenated downs, ups scaled by ratio * alpha / rank, alpha = new rank (scale 1)."""
    import torch

    reference = parts[0][1]
    downs = [p.down.float().reshape(p.rank, *reference.down.shape[1:]) for _, p in parts]
    ups = [(s * p.up.float()).reshape(reference.up.shape[0], p.rank, *reference.up.shape[2:]) for s, p in parts]
    down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
    return LoraPair(down.to(dtype), up.to(dtype), torch.tensor(float(down.shape[0]), dtype=dtype))


def _svd_pair(parts: list[tuple[float, LoraPair]], rank: int, device, dtype) -> LoraPair:
    """Best rank-`rank` approximation of the summed deltas; singular values split over up and down.

    The sum is ups @ downs with the ranks stacked (R = total rank), so its SVD comes from the R x R
    core of two QR factorisations instead of a full SVD of the out x in matrix.
    """
    import torch

    reference = parts[0][1]
    ups = torch.cat([s * p.up.to(device, torch.float32).reshape(p.up.shape[0], p.rank) for s, p in parts], dim=1)
    downs = torch.cat([p.down.to(device, torch.float32).reshape(p.rank, -1) for _, p in parts], dim=0)
    q_up, r_up = torch.linalg.qr(ups)
    q_down, r_down = torch.linalg.qr(downs.T)
    u, singular, vh = torch.linalg.svd(r_up @ r_down.T)
    rank = min(rank, singular.shape[0])
    root = singular[:rank].sqrt()
    up = (q_up @ u[:, :rank]) * root
    down = root[:, None] * (vh[:rank] @ q_down.T)
    down = down.reshape(rank, *reference.down.shape[1:])
    up = up.reshape(up.shape[0], rank, *([1] * (reference.up.dim() - 2)))
    return LoraPair(down.cpu().to(dtype), up.cpu().to(dtype), torch.tensor(float(rank), dtype=dtype))


def merge_loras(loras: list[MergeLora], concat: bool, new_rank: Optional[int], new_conv_rank: Optional[int],
                device="cpu", dtype=None) -> dict[str, LoraPair]:
    """One LoRA equal to applying all of them (exact with concat; else the SVD truncation to new_rank)."""
    if not concat and new_rank is None:
        raise UserError("merging LoRAs into one needs --concat (exact) or --new_rank N (SVD)")
    families = {detect_family(f"{name}.lora_down.weight" for name in lora.pairs) for lora in loras} - {"unknown"}
    if len(families) > 1:
        raise UserError(f"the LoRAs are for different models ({', '.join(sorted(families))}); merge LoRAs of one family")
    variant = next(((name, pair) for lora in loras for name, pair in lora.pairs.items()
                    if not is_plain_lora(pair)), None)
    if variant is not None:
        raise UserError(f"merging into one LoRA takes plain LoRA pairs; {variant[0]} is a {variant[1].label} module. "
                        "Merge such files into a checkpoint (--model) instead")
    if concat and (new_rank is not None or new_conv_rank is not None):
        raise UserError("--concat keeps every rank; drop --new_rank/--new_conv_rank, or drop --concat for SVD")
    dtype = dtype or next(iter(loras[0].pairs.values())).down.dtype
    names = list(dict.fromkeys(name for lora in loras for name in lora.pairs))
    merged = {}
    for name in names:
        parts = [(lora.ratio * lora.pairs[name].scale, lora.pairs[name]) for lora in loras if name in lora.pairs]
        if concat:
            merged[name] = _concat_pair(parts, dtype)
        else:
            is_conv = parts[0][1].down.dim() == 4 and parts[0][1].down.shape[-1] > 1
            merged[name] = _svd_pair(parts, (new_conv_rank or new_rank) if is_conv else new_rank, device, dtype)
    return merged


def merged_lora_metadata(loras: list[MergeLora], merged: dict[str, LoraPair], method: str) -> dict[str, str]:
    ranks = {pair.rank for pair in merged.values()}
    alphas = {pair.alpha_value() for pair in merged.values()}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_merged_from": _merge_record(loras), "ss_merge_method": method,
    }
    for key in ("ss_base_model_version", "modelspec.architecture"):
        values = {lora.metadata.get(key) for lora in loras}
        if len(values) == 1 and None not in values:
            metadata[key] = values.pop()
    return metadata
