"""Fusing LoRAs into a loaded model's weights in memory, at any strength (tools/generate.py).

Each LoRA file (any of our layouts: kohya, diffusers/PEFT, ComfyUI; renamed to kohya names by
library/lora_formats.py through `lora_merge.load_loras`) is matched to the in-memory layers through the
family's LoRA targets, the same search that places LoRA modules for training
(networks/lora_modules.find_lora_layers), so a file trained by us lands on exactly the layers it was
trained on; a module the file fuses (BFL's qkv) is split by rows over the separate layers the model
holds. `FusedLoras.set_strength(s)` writes W = W0 + s * sum(ratio * change) into every touched layer
(change = alpha / rank * up @ down for a LoRA; LoHa, LoKr and DoRA changes come from
library/lora_deltas.py), computed in float32 from the original weight (kept in CPU memory only when the
strength is to change again, e.g. for a strength sweep), so any strength is exact, not a drift of
repeated additions. Every module of every LoRA must find its layer, else one UserError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from library.lora_merge import MergeLora, add_lora_, check_coverage

if TYPE_CHECKING:
    import torch


def lora_layer_map(family, components) -> dict[str, list[tuple[str, object, Optional[tuple[int, int]]]]]:
    """kohya LoRA name -> [(layer path, layer, up rows)] over every part LoRA can target."""
    from networks.lora_fused import row_ranges
    from networks.lora_modules import find_lora_layers

    places: dict[str, list] = {}
    for target in family.lora_targets(components):
        for found in find_lora_layers(target, with_conv3x3=True):
            name = target.file_name(found.path)
            if not found.members:
                places[name] = [(found.path, found.layer, None)]
                continue
            ranges = row_ranges([layer.weight.shape[0] for _, layer in found.members])
            places[name] = [(path, layer, rows) for (path, layer), rows in zip(found.members, ranges)]
    return places


class FusedLoras:
    """LoRAs fused into the model's layers; set_strength chooses how strongly (1 = the given ratios)."""

    def __init__(self, family, components, loras: list[MergeLora], model: str, keep_originals: bool) -> None:
        places = lora_layer_map(family, components)
        check_coverage(loras, set(places), family, model)
        self.loras = loras
        # kohya module name -> the layers it changes [(path, layer, up rows)]; a fused module has several
        self.modules = {name: places[name] for lora in loras for name in lora.pairs}
        layer_ids = [id(layer) for members in self.modules.values() for _, layer, _ in members]
        if len(layer_ids) != len(set(layer_ids)):
            raise ValueError("two LoRA module names map to one layer; the family's LoRA targets overlap")
        self.originals: Optional[dict[int, "torch.Tensor"]] = {} if keep_originals else None
        self._fused = False

    @property
    def layer_count(self) -> int:
        return sum(len(members) for members in self.modules.values())

    def set_strength(self, strength: float) -> None:
        """Every touched layer becomes W0 + strength * (its LoRAs' changes at their ratios). A fused module's
        layers are joined into the fused weight first, so DoRA's norms see the whole weight, as in the file."""
        import torch

        if self._fused and self.originals is None:
            raise RuntimeError("the original weights were not kept; create FusedLoras with keep_originals=True")
        with torch.no_grad():
            for name, members in self.modules.items():
                device = members[0][1].weight.device
                parts = [self._original(id(layer), layer).to(device=device, dtype=torch.float32, copy=True)
                         for _, layer, _ in members]
                weight = parts[0] if len(parts) == 1 else torch.cat(parts)
                for lora in self.loras:
                    pair = lora.pairs.get(name)
                    if pair is not None:
                        add_lora_(weight, pair, strength * lora.ratio, name, members[0][0])
                start = 0
                for (_, layer, _), part in zip(members, parts):
                    layer.weight.copy_(weight[start:start + part.shape[0]])
                    start += part.shape[0]
        self._fused = True

    def _original(self, key: int, layer) -> "torch.Tensor":
        if self.originals is None:
            return layer.weight.detach()
        if key not in self.originals:
            self.originals[key] = layer.weight.detach().to("cpu", copy=True)
        return self.originals[key]
