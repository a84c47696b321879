"""What one module of a LoRA-type file changes in its layer's weight: LoRA, LoHa, LoKr, each with or without DoRA.

A file module is read into one of three weight holders, each knowing its tensors' key suffixes (the
kohya/LyCORIS layout ComfyUI loads) and its weight delta, so merge and fuse code asks every module the
same question (`weight_change`) and never branches on the kind:
- `LoraPair`: `lora_down.weight` [r, in(, kh, kw)], `lora_up.weight` [out, r(, 1, 1)]; delta = up @ down.
- `LohaWeights`: `hada_w1_a` [out, r], `hada_w1_b` [r, in*kh*kw], `hada_w2_a`, `hada_w2_b`;
  delta = (w1_a @ w1_b) * (w2_a @ w2_b) (Hadamard product), reshaped to the weight.
- `LokrWeights`: `lokr_w1` [out_l, in_m] or its factors `lokr_w1_a` @ `lokr_w1_b`, `lokr_w2` [out_k, in_n(, kh, kw)]
  or `lokr_w2_a` @ `lokr_w2_b`; delta = kron(w1, w2). Its alpha counts only when a factor is low rank
  (scale 1 when both are full matrices), as LyCORIS and ComfyUI do.
Every kind scales its delta by alpha / rank (alpha missing: = rank). With a `dora_scale` tensor (DoRA,
LyCORIS' `dora_wd` layout, [1, in(, 1, 1)]) the new weight is W' = (W + delta) * dora_scale / ||W + delta||,
the norm taken per input channel over all outputs (and kernel positions); a strength s gives W + s (W' - W),
as ComfyUI applies it. `factorization` is LyCORIS' split of a width into two factors for LoKr. Our code:
these are the published formulas; tests compare them with PEFT's LoHa/LoKr/DoRA layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

from library.errors import UserError

if TYPE_CHECKING:
    import torch


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = factor when it divides, else the largest divisor of
    dimension that is at most sqrt(dimension) and at most factor (factor <= 0: no such limit)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor <= 0 else factor
    best = 1
    for m in range(1, int(dimension ** 0.5) + 1):
        if m > limit:
            break
        if dimension % m == 0:
            best = m
    return best, dimension // best


def dora_change(weight: "torch.Tensor", delta: "torch.Tensor", dora_scale: "torch.Tensor") -> "torch.Tensor":
    """W' - W for DoRA on the input axis (LyCORIS, ComfyUI): W' = (W + delta) * s with s = dora_scale / (the
    norm of W + delta per input channel + eps). Computed in float32 as W (s - 1) + delta s, so a small
    change keeps its precision even when W and delta are half-precision tensors."""
    import torch

    weight, delta = weight.float(), delta.float()
    factor = dora_scale.float() / (dora_scale_of(weight + delta) + torch.finfo(torch.float32).eps)
    return weight * (factor - 1) + delta * factor


def dora_scale_of(weight: "torch.Tensor") -> "torch.Tensor":
    """The dora_scale that leaves `weight` unchanged: its norm per input channel, shaped [1, in(, 1, 1)]."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return columns.norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def loha_delta(w1_a, w1_b, w2_a, w2_b, shape) -> "torch.Tensor":
    return ((w1_a @ w1_b) * (w2_a @ w2_b)).reshape(shape)


def lokr_delta(w1, w2, shape) -> "torch.Tensor":
    import torch

    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape)


class _Weights:
    """Shared behaviour of the three holders; subclasses name their tensors in KEYS (field -> key suffix)."""

    KEYS: ClassVar[dict[str, str]] = {}
    kind: ClassVar[str] = ""

    alpha: Optional["torch.Tensor"]
    dora_scale: Optional["torch.Tensor"]

    @property
    def rank(self) -> Optional[int]:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def delta(self, shape) -> "torch.Tensor":
        """The unscaled float32 delta, shaped `shape` (the whole layer's weight)."""
        raise NotImplementedError

    def alpha_value(self) -> float:
        rank = self.rank
        if self.alpha is None or rank is None:
            return float(rank or 1)
        return float(self.alpha.float().item())

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha_value() / self.rank

    @property
    def label(self) -> str:
        return self.kind + (" + DoRA" if self.dora_scale is not None else "")

    def tensors(self, name: str) -> dict[str, "torch.Tensor"]:
        """`<name>.<suffix>` -> tensor for every tensor this module holds (alpha written as rank when absent)."""
        import torch

        out = {f"{name}.{suffix}": getattr(self, field) for field, suffix in self.KEYS.items()
               if getattr(self, field) is not None}
        reference = next(iter(out.values()))
        alpha = self.alpha if self.alpha is not None else torch.tensor(float(self.rank or 1), dtype=reference.dtype)
        return {**out, f"{name}.alpha": alpha}

    def weight_change(self, original: Optional["torch.Tensor"], shape, ratio: float, name: str) -> "torch.Tensor":
        """float32 change of the whole weight at strength `ratio`; DoRA needs `original` (float32, shaped `shape`)."""
        delta = self.delta(shape) * self.scale
        if self.dora_scale is None:
            return delta * ratio
        if original is None:
            raise UserError(f"DoRA module {name} rescales a weight that this model stores in separate pieces "
                            "(e.g. q, k and v of a fused qkv); merge it into a checkpoint that keeps them fused")
        return dora_change(original, delta, self.dora_scale.to(original.device)) * ratio


def _f32(tensor, device):
    import torch

    return None if tensor is None else tensor.to(device=device, dtype=torch.float32)


@dataclass
class LoraPair(_Weights):
    """One module's low-rank pair as stored (dtypes kept); alpha None means alpha = rank."""

    down: "torch.Tensor"
    up: "torch.Tensor"
    alpha: Optional["torch.Tensor"] = None
    dora_scale: Optional["torch.Tensor"] = None

    KEYS: ClassVar[dict[str, str]] = {"down": "lora_down.weight", "up": "lora_up.weight", "dora_scale": "dora_scale"}
    kind: ClassVar[str] = "LoRA"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def delta(self, shape) -> "torch.Tensor":
        device = self.down.device
        up = _f32(self.up, device).reshape(self.up.shape[0], self.rank)
        return (up @ _f32(self.down, device).reshape(self.rank, -1)).reshape(shape)


@dataclass
class LohaWeights(_Weights):
    w1_a: "torch.Tensor"
    w1_b: "torch.Tensor"
    w2_a: "torch.Tensor"
    w2_b: "torch.Tensor"
    alpha: Optional["torch.Tensor"] = None
    dora_scale: Optional["torch.Tensor"] = None

    KEYS: ClassVar[dict[str, str]] = {"w1_a": "hada_w1_a", "w1_b": "hada_w1_b", "w2_a": "hada_w2_a",
                                      "w2_b": "hada_w2_b", "dora_scale": "dora_scale"}
    kind: ClassVar[str] = "LoHa"

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.w1_a.shape[0])

    def delta(self, shape) -> "torch.Tensor":
        device = self.w1_a.device
        return loha_delta(*(_f32(t, device) for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b)), shape)


@dataclass
class LokrWeights(_Weights):
    w1: Optional["torch.Tensor"] = None
    w1_a: Optional["torch.Tensor"] = None
    w1_b: Optional["torch.Tensor"] = None
    w2: Optional["torch.Tensor"] = None
    w2_a: Optional["torch.Tensor"] = None
    w2_b: Optional["torch.Tensor"] = None
    alpha: Optional["torch.Tensor"] = None
    dora_scale: Optional["torch.Tensor"] = None

    KEYS: ClassVar[dict[str, str]] = {"w1": "lokr_w1", "w1_a": "lokr_w1_a", "w1_b": "lokr_w1_b", "w2": "lokr_w2",
                                      "w2_a": "lokr_w2_a", "w2_b": "lokr_w2_b", "dora_scale": "dora_scale"}
    kind: ClassVar[str] = "LoKr"

    @property
    def rank(self) -> Optional[int]:
        """The low rank of a factorised w1 or w2; None when both are full matrices (alpha then unused)."""
        factor = self.w1_b if self.w1_b is not None else self.w2_b
        return None if factor is None else int(factor.shape[0])

    @property
    def out_features(self) -> int:
        out_l = self.w1.shape[0] if self.w1 is not None else self.w1_a.shape[0]
        out_k = self.w2.shape[0] if self.w2 is not None else self.w2_a.shape[0]
        return int(out_l * out_k)

    def factors(self, device) -> tuple["torch.Tensor", "torch.Tensor"]:
        w1 = _f32(self.w1, device) if self.w1 is not None else _f32(self.w1_a, device) @ _f32(self.w1_b, device)
        w2 = _f32(self.w2, device) if self.w2 is not None else _f32(self.w2_a, device) @ _f32(self.w2_b, device)
        return w1, w2

    def delta(self, shape) -> "torch.Tensor":
        device = next(t for t in (self.w1, self.w1_a) if t is not None).device
        return lokr_delta(*self.factors(device), shape)


WEIGHT_KINDS = (LoraPair, LohaWeights, LokrWeights)
# key suffix (without the leading dot) -> (holder class or None for shared keys, field)
SUFFIXES: dict[str, tuple] = {"alpha": (None, "alpha"), "dora_scale": (None, "dora_scale")}
for _kind in WEIGHT_KINDS:
    SUFFIXES.update({suffix: (_kind, field) for field, suffix in _kind.KEYS.items() if field != "dora_scale"})


def weights_from_parts(name: str, parts: dict[str, "torch.Tensor"], path: str) -> _Weights:
    """The holder of one module's tensors (parts: key suffix -> tensor); UserError when they do not form one."""
    kinds = {SUFFIXES[suffix][0] for suffix in parts} - {None}
    if len(kinds) != 1:
        found = ", ".join(sorted(parts))
        raise UserError(f"{path}: module `{name}` has tensors {found}, which are not one LoRA, LoHa or LoKr module")
    kind = kinds.pop()
    values = {SUFFIXES[suffix][1]: tensor for suffix, tensor in parts.items()}
    required = {LoraPair: ("down", "up"), LohaWeights: ("w1_a", "w1_b", "w2_a", "w2_b")}.get(kind, ())
    missing = [kind.KEYS[f] for f in required if f not in values]
    if kind is LokrWeights:
        missing += [f"lokr_{w} or lokr_{w}_a/_b" for w in ("w1", "w2")
                    if w not in values and not (f"{w}_a" in values and f"{w}_b" in values)]
    if missing:
        raise UserError(f"{path}: module `{name}` lacks {', '.join(missing)}")
    return kind(**values)


def is_plain_lora(weights: _Weights) -> bool:
    return isinstance(weights, LoraPair) and weights.dora_scale is None
