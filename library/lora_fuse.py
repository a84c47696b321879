"""Fusing LoRAs into a loaded model's weights in memory, at any strength (tools/generate.py).

Each LoRA file (any of our layouts: kohya, diffusers/PEFT, ComfyUI; renamed to kohya names by
library/lora_formats.py through `lora_merge.load_loras`) is matched to the in-memory layers through the
family's LoRA targets, the same search that places LoRA modules for training
(networks/lora_modules.find_lora_layers), so a file trained by us lands on exactly the layers it was
trained on; a module the file fuses (BFL's qkv) is split by rows over the separate layers the model
holds. `FusedLoras.set_strength(s)` writes W = W0 + s * sum(ratio * alpha / rank * up @ down) into
every touched layer, computed in float32 from the original weight (kept in CPU memory only when the
strength is to change again, e.g. for a strength sweep), so any strength is exact, not a drift of
repeated additions. Every module of every LoRA must find its layer, else one UserError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from library.lora_merge import MergeLora, add_lora_, check_coverage

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerUpdate:
    """One LoRA module's share of one layer: the layer gets up[up_rows] @ down."""

    lora_name: str
    up_rows: Optional[tuple[int, int]] = None


def lora_layer_map(family, components) -> dict[str, list[tuple[str, object, Optional[tuple[int, int]]]]]:
    """kohya LoRA name -> [(layer path, layer, up rows)] over every part LoRA can target."""
    from networks.lora_modules import find_lora_layers

    places: dict[str, list] = {}
    for target in family.lora_targets(components):
        for found in find_lora_layers(target, with_conv3x3=True):
            name = target.file_name(found.path)
            if not found.members:
                places[name] = [(found.path, found.layer, None)]
                continue
            start, rows = 0, []
            for path, layer in found.members:
                rows.append((path, layer, (start, start + layer.weight.shape[0])))
                start += layer.weight.shape[0]
            places[name] = rows
    return places


class FusedLoras:
    """LoRAs fused into the model's layers; set_strength chooses how strongly (1 = the given ratios)."""

    def __init__(self, family, components, loras: list[MergeLora], model: str, keep_originals: bool) -> None:
        places = lora_layer_map(family, components)
        check_coverage(loras, set(places), family, model)
        self.loras = loras
        self.layers: dict[int, tuple[str, object, list[LayerUpdate]]] = {}
        for lora in loras:
            for name in lora.pairs:
                for path, layer, up_rows in places[name]:
                    entry = self.layers.setdefault(id(layer), (path, layer, []))
                    if LayerUpdate(name, up_rows) not in entry[2]:
                        entry[2].append(LayerUpdate(name, up_rows))
        self.originals: Optional[dict[int, "torch.Tensor"]] = {} if keep_originals else None
        self._fused = False

    @property
    def layer_count(self) -> int:
        return len(self.layers)

    def set_strength(self, strength: float) -> None:
        """Every touched layer becomes W0 + strength * (its LoRAs' deltas at their ratios)."""
        import torch

        if self._fused and self.originals is None:
            raise RuntimeError("the original weights were not kept; create FusedLoras with keep_originals=True")
        with torch.no_grad():
            for key, (path, layer, updates) in self.layers.items():
                weight = self._original(key, layer).to(device=layer.weight.device, dtype=torch.float32, copy=True)
                for lora in self.loras:
                    for update in updates:
                        pair = lora.pairs.get(update.lora_name)
                        if pair is not None:
                            add_lora_(weight, pair, strength * lora.ratio * pair.scale, update.lora_name, path,
                                      update.up_rows)
                layer.weight.copy_(weight)
        self._fused = True

    def _original(self, key: int, layer) -> "torch.Tensor":
        if self.originals is None:
            return layer.weight.detach()
        if key not in self.originals:
            self.originals[key] = layer.weight.detach().to("cpu", copy=True)
        return self.originals[key]
