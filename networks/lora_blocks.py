"""Per-block LoRA ranks, alphas and learning rates: sd-scripts' block `--network_args` for UNets.

The keys and their meaning are sd-scripts' networks/lora.py ones: `block_dims`, `block_alphas`,
`conv_block_dims`, `conv_block_alphas` (one comma-separated value per block: 25 for SD 1.x/2.x, 23
for SDXL), `down_lr_weight`/`up_lr_weight` (one value per IN/OUT block, or a preset `cosine`, `sine`,
`linear`, `reverse_linear`, `zeros`, each with an optional `+offset`), `mid_lr_weight` and
`block_lr_zero_threshold` (weights at or below it become 0). A block whose rank or lr weight is 0
gets no LoRA module at all. Which module lies in which block is the family's `LoraBlockLayout`
(library/families/base.py); the keys are refused for models without one. Parsing a key's syntax
happens with the other options (`parse_block_arg`); `BlockPlan.build` checks the value counts
against the model's layout and answers each module's rank, alpha and lr weight.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from library.errors import UserError
from library.families.base import LoraBlockLayout

logger = logging.getLogger(__name__)

PER_BLOCK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
BLOCK_KEYS = PER_BLOCK_KEYS + LR_WEIGHT_KEYS + ("block_lr_zero_threshold",)
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def _numbers(key: str, text: str, kind: type) -> tuple:
    text = text.strip().removeprefix("[").removesuffix("]")
    try:
        values = tuple(kind(part.strip()) if part.strip() else kind(0) for part in text.split(","))
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise UserError(f"--network_args {key}={text}: expected comma-separated {what}")
    if any(value < 0 for value in values):
        raise UserError(f"--network_args {key}={text}: values must not be negative")
    return values


def _lr_weights(key: str, text: str):
    """A list of weights (sd-scripts reads an empty entry as 0), or (preset, offset)."""
    name, plus, offset = text.strip().partition("+")
    if name.strip() in LR_PRESETS:
        try:
            return name.strip(), float(offset) if plus else 0.0
        except ValueError:
            raise UserError(f"--network_args {key}={text}: the offset after + must be a number")
    try:
        return tuple(float(part) if part.strip() else 0.0 for part in text.split(","))
    except ValueError:
        raise UserError(f"--network_args {key}={text}: use comma-separated numbers or a preset "
                        f"({', '.join(LR_PRESETS)}, optionally +offset)")


def parse_block_arg(key: str, text: str):
    """The syntax check of one block key's value (counts are checked against the model later)."""
    if key in ("block_dims", "conv_block_dims"):
        return _numbers(key, text, int)
    if key in ("block_alphas", "conv_block_alphas"):
        return _numbers(key, text, float)
    if key == "block_lr_zero_threshold":
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--network_args block_lr_zero_threshold={text}: expected a number")
    if key == "mid_lr_weight":
        return _numbers(key, text, float) if text.strip() else ()
    return _lr_weights(key, text)


def preset_weights(name: str, offset: float, count: int) -> list[float]:
    """sd-scripts' lr-weight presets over `count` blocks (shallow -> deep for IN, deep -> shallow for OUT)."""
    ramp = [i / (count - 1) for i in range(count)]
    curves = {
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * count,
    }
    return [value + offset for value in curves[name]]


def _side_weights(key: str, value, count: int) -> list[float]:
    weights = preset_weights(*value, count) if isinstance(value[0], str) else list(value)
    if len(weights) > count:
        raise UserError(f"--network_args {key}: {len(weights)} values, but this model has {count} such blocks")
    if len(weights) < count:
        logger.warning("--network_args %s: %d of %d values given; the rest are 1", key, len(weights), count)
    return weights + [1.0] * (count - len(weights))


def _lr_weight_table(layout: LoraBlockLayout, given: dict) -> Optional[list[float]]:
    """One lr weight per block, or None when no lr-weight key is given."""
    if not any(key in given for key in LR_WEIGHT_KEYS):
        return None
    threshold = given.get("block_lr_zero_threshold", 0.0)
    counts = {"down_lr_weight": layout.down, "mid_lr_weight": layout.mid, "up_lr_weight": layout.down}
    weights = [1.0] * layout.extra
    for key in LR_WEIGHT_KEYS:
        side = _side_weights(key, given[key], counts[key]) if key in given else [1.0] * counts[key]
        weights += [w if w > threshold else 0.0 for w in side]
    return weights + [1.0] * layout.extra


def _per_block(key: str, given: dict, count: int, default) -> Optional[list]:
    if key not in given:
        return None if default is None else [default] * count
    values = list(given[key])
    if len(values) != count:
        raise UserError(f"--network_args {key}: {len(values)} values given, this model has {count} blocks "
                        f"(see docs/training.md for the block order)")
    return values


@dataclass(frozen=True)
class BlockPlan:
    """Rank, alpha and lr weight of every numbered block of one LoRA target."""

    layout: LoraBlockLayout
    dims: list
    alphas: list
    conv_dims: Optional[list]
    conv_alphas: Optional[list]
    lr_weights: Optional[list]  # None: no per-block learning rates

    @classmethod
    def build(cls, layout: Optional[LoraBlockLayout], given: dict, dim: int, alpha: float,
              conv_dim: Optional[int], conv_alpha: Optional[float]) -> Optional["BlockPlan"]:
        """The plan for the block keys in `given` (parsed values), None when none is given."""
        if not given:
            return None
        if layout is None:
            raise UserError(f"--network_args {next(iter(given))}: no trained UNet with numbered blocks (SD 1.x/2.x and "
                            "SDXL UNets have them); see docs/training.md for this family's own keys")
        if "conv_block_alphas" in given and "conv_block_dims" not in given:
            raise UserError("--network_args conv_block_alphas needs conv_block_dims")
        if "block_lr_zero_threshold" in given and not any(key in given for key in LR_WEIGHT_KEYS):
            raise UserError("--network_args block_lr_zero_threshold needs down_lr_weight, mid_lr_weight or up_lr_weight")
        count = layout.count
        dims = _per_block("block_dims", given, count, dim)
        conv_dims = _per_block("conv_block_dims", given, count, conv_dim)
        conv_alphas = _per_block("conv_block_alphas", given, count,
                                 (conv_alpha if conv_alpha is not None else 1.0) if conv_dims else None)
        lr_weights = _lr_weight_table(layout, given)
        if lr_weights is not None:  # sd-scripts: a block that does not learn gets no module
            dims = [0 if w == 0 else d for d, w in zip(dims, lr_weights)]
            conv_dims = conv_dims and [0 if w == 0 else d for d, w in zip(conv_dims, lr_weights)]
        alphas = _per_block("block_alphas", given, count, alpha)
        return cls(layout, dims, alphas, conv_dims, conv_alphas, lr_weights)

    @property
    def with_conv3x3(self) -> bool:
        return self.conv_dims is not None

    def block_of(self, name: str) -> Optional[int]:
        return self.layout.block_index(name)

    def rank_alpha(self, name: str, is_conv3x3: bool) -> Optional[tuple[int, float]]:
        """(rank, alpha) of module `name`; None when it lies in no block (network-wide settings)."""
        block = self.block_of(name)
        if block is None:
            return None
        if is_conv3x3:
            return self.conv_dims[block], self.conv_alphas[block]
        return self.dims[block], self.alphas[block]

    def lr_weight(self, name: str) -> float:
        block = self.block_of(name)
        return 1.0 if self.lr_weights is None or block is None else self.lr_weights[block]
