"""Trainable adapters that change a layer's whole weight: LoHa, LoKr and DoRA (on LoRA, LoHa or LoKr).

Unlike a plain LoRA (networks/lora_modules.py), whose output up(down(x)) needs no weight-sized tensor,
these adapters build their weight change D each forward and add `linear(x, D)` (or the layer's
convolution with D) to the layer's output through a forward hook; the layer's own weights stay
untouched. `WeightAdapter` holds what they share: the hook on one layer or on every member of a
fused group (FLUX's q/k/v as one `qkv` module: D is computed once per input for the fused weight and
each member adds its rows), module dropout, the multiplier (W + m * (W' - W), as ComfyUI applies a
strength) and DoRA: with `use_dora`, a trainable `dora_scale` [1, in(, 1, 1)] starts at the column
norms of the (fused) weight and W' = (W + delta) * dora_scale / ||W + delta|| per input channel.
Subclasses give the parameters (named as the LyCORIS file keys: `hada_w1_a`, `lokr_w1`, `lora_down`, ...)
and the unscaled delta; the formulas are library/lora_deltas.py's, shared with merging.
`load_adapter_weights` restores such modules from a file (--network_weights). Our own code: the
lycoris-lora package replaces each layer's forward, which cannot serve fused layers or our block swap.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from library.errors import UserError, did_you_mean
from library.lora_deltas import dora_change, dora_scale_of, factorization, loha_delta, lokr_delta
from networks.lora_fused import MemberHooks, row_ranges


class WeightAdapter(MemberHooks, nn.Module):
    """A weight change added to one layer (or a fused group of Linears) by forward hooks."""

    kind = ""

    def __init__(self, lora_name: str, members: list[nn.Module], alpha: float, rank: int, multiplier: float,
                 module_dropout: float | None, use_dora: bool):
        super().__init__()
        self.lora_name = lora_name
        self.rank = rank
        self.is_conv = isinstance(members[0], nn.Conv2d)
        sizes = [member.weight.shape[0] for member in members]
        self.weight_shape = (sum(sizes), *members[0].weight.shape[1:])
        self.row_ranges = row_ranges(sizes)
        alpha = float(rank if not alpha else alpha)  # alpha 0 or None means alpha = rank
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / rank
        self.multiplier = multiplier
        self.module_dropout = module_dropout
        self._original = tuple(members)  # a tuple keeps the layers out of our parameters and state dict
        if use_dora:
            self.dora_scale = nn.Parameter(dora_scale_of(self.original_weight().float()))
        else:
            self.dora_scale = None
        self._hook_handles = []

    # --- subclasses ---------------------------------------------------------------------------

    def unscaled_delta(self) -> torch.Tensor:
        """The delta before alpha / rank, shaped like the (fused) weight."""
        raise NotImplementedError

    # --- the weight change ----------------------------------------------------------------------

    def original_weight(self) -> torch.Tensor:
        weights = [member.weight.detach() for member in self.members]
        return weights[0] if len(weights) == 1 else torch.cat(weights)

    def weight_change(self) -> torch.Tensor:
        """W' - W at the current multiplier, shaped like the (fused) weight."""
        delta = self.unscaled_delta() * self.scale
        if self.dora_scale is None:
            return delta * self.multiplier
        change = dora_change(self.original_weight(), delta, self.dora_scale) * self.multiplier
        return change.to(delta.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The weight change (multiplier included) in float32, for checks and merging."""
        return self.weight_change().detach().float()

    # --- hooks (networks/lora_fused.MemberHooks) --------------------------------------------------

    def shared_value(self, x: torch.Tensor):
        """The change of the whole (fused) weight, or None when module dropout skips every member."""
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return None
        return self.weight_change()

    def member_output(self, index: int, layer: nn.Module, x: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        start, stop = self.row_ranges[index]
        weight = change[start:stop]
        x = x.to(weight.dtype)
        if isinstance(layer, nn.Conv2d):
            return nn.functional.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
        return nn.functional.linear(x, weight)


class DoRALoRAModule(WeightAdapter):
    """LoRA with DoRA: `lora_down`/`lora_up` as in a kohya LoRA, plus `dora_scale`."""

    kind = "DoRA"

    def __init__(self, lora_name: str, members: list[nn.Module], rank: int, alpha: float, multiplier: float = 1.0,
                 module_dropout: float | None = None):
        super().__init__(lora_name, members, alpha, rank, multiplier, module_dropout, use_dora=True)
        first, out = members[0], self.weight_shape[0]
        if self.is_conv:
            self.lora_down = nn.Conv2d(first.in_channels, rank, first.kernel_size, first.stride, first.padding,
                                       dilation=first.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, out, (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(first.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def unscaled_delta(self) -> torch.Tensor:
        up = self.lora_up.weight.reshape(self.weight_shape[0], self.rank)
        return (up @ self.lora_down.weight.reshape(self.rank, -1)).reshape(self.weight_shape)


class LoHaModule(WeightAdapter):
    """LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank; w2_a starts at zero so training starts at W."""

    kind = "LoHa"

    def __init__(self, lora_name: str, members: list[nn.Module], rank: int, alpha: float, multiplier: float = 1.0,
                 module_dropout: float | None = None, use_dora: bool = False):
        super().__init__(lora_name, members, alpha, rank, multiplier, module_dropout, use_dora)
        out, inputs = self.weight_shape[0], math.prod(self.weight_shape[1:])
        self.hada_w1_a = nn.Parameter(torch.empty(out, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, inputs))
        self.hada_w2_a = nn.Parameter(torch.zeros(out, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, inputs))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def unscaled_delta(self) -> torch.Tensor:
        return loha_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.weight_shape)


class LoKrModule(WeightAdapter):
    """LoKr: kron(w1, w2) with out = out_l * out_k and in = in_m * in_n (LyCORIS' factorization).

    w1 [out_l, in_m] is a full matrix unless decompose_both and the rank is below half its larger side;
    w2 [out_k, in_n(, kh, kw)] is factorised into w2_a @ w2_b when the rank is below half its larger side.
    When both are full matrices alpha has no effect (scale 1), as LyCORIS and ComfyUI do."""

    kind = "LoKr"

    def __init__(self, lora_name: str, members: list[nn.Module], rank: int, alpha: float, multiplier: float = 1.0,
                 module_dropout: float | None = None, use_dora: bool = False, factor: int = -1,
                 decompose_both: bool = False):
        super().__init__(lora_name, members, alpha, rank, multiplier, module_dropout, use_dora)
        out_l, out_k = factorization(self.weight_shape[0], factor)
        in_m, in_n = factorization(self.weight_shape[1], factor)
        kernel = tuple(self.weight_shape[2:])
        self.w1_factored = decompose_both and rank < max(out_l, in_m) / 2
        self.w2_factored = rank < max(out_k, in_n) / 2
        if self.w1_factored:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, in_m))
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.w2_factored:
            self.lokr_w2_a = nn.Parameter(torch.zeros(out_k, rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, in_n * math.prod(kernel)))
            nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n, *kernel))
        if not (self.w1_factored or self.w2_factored):
            self.alpha.fill_(float(rank))
            self.scale = 1.0
        self._w2_shape = (out_k, in_n, *kernel)

    def unscaled_delta(self) -> torch.Tensor:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.w1_factored else self.lokr_w1
        w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self._w2_shape) if self.w2_factored else self.lokr_w2
        return lokr_delta(w1, w2, self.weight_shape)


def load_adapter_weights(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], path: str) -> int:
    """Copy a file's tensors into the matching modules; every file module must match one of ours in
    kind, tensor names, shapes and alpha. Returns how many modules the file held."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        by_module.setdefault(name, {})[suffix] = tensor
    unknown = [name for name in by_module if name not in modules]
    if unknown:
        raise UserError(f"{path}: {len(unknown)} of its {len(by_module)} modules have no counterpart in this network, "
                        f"e.g. `{unknown[0]}`{did_you_mean(unknown[0], modules)}; the file was made for another "
                        "model or with other settings (conv_dim, --network_train_*_only)")
    for name, file_tensors in by_module.items():
        _load_module(modules[name], name, file_tensors, path)
    return len(by_module)


def _load_module(module: nn.Module, name: str, file_tensors: dict[str, torch.Tensor], path: str) -> None:
    ours = module.state_dict()
    if set(file_tensors) != set(ours):
        raise UserError(f"{path}: module `{name}` holds {', '.join(sorted(file_tensors))} but this network's module "
                        f"has {', '.join(sorted(ours))}: the file was trained with another algo, factor, "
                        "decompose_both, dora setting or rank; use the file's --network_args")
    for key, tensor in file_tensors.items():
        if tensor.shape != ours[key].shape:
            raise UserError(f"{path}: module `{name}` has {key} of shape {tuple(tensor.shape)}, this network needs "
                            f"{tuple(ours[key].shape)}: use the file's --network_dim/conv_dim/factor")
    file_alpha = file_tensors["alpha"].float().item()
    our_alpha = ours["alpha"].to(file_tensors["alpha"].dtype).float().item()
    if file_alpha != our_alpha:
        raise UserError(f"{path}: module `{name}` has alpha {file_alpha:g} but this network's is "
                        f"{ours['alpha'].item():g}; "
                        f"use --network_alpha {file_alpha:g} (conv_alpha for 3x3 convolutions) to continue this file")
    module.load_state_dict({**file_tensors, "alpha": ours["alpha"]})


def build_weight_adapter(options, name: str, members: list[nn.Module], rank: int, alpha: float,
                         multiplier: float) -> WeightAdapter:
    """The adapter `options` (networks.lora's LoRAOptions: algo, use_dora, factor, ...) asks for on these layers."""
    common = {"multiplier": multiplier, "module_dropout": options.module_dropout}
    if options.algo == "loha":
        return LoHaModule(name, members, rank, alpha, use_dora=options.use_dora, **common)
    if options.algo == "lokr":
        return LoKrModule(name, members, rank, alpha, use_dora=options.use_dora, factor=options.factor,
                          decompose_both=options.decompose_both, **common)
    return DoRALoRAModule(name, members, rank, alpha, **common)
