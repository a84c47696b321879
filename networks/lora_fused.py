"""One LoRA module over several sibling Linears that a checkpoint layout fuses into one tensor.

BFL's FLUX files hold q, k and v (in single blocks also the MLP input) as one `qkv`/`linear1` linear,
where diffusers has separate layers reading the same input. A LoRA on the fused linear,
W_fused += scale * up @ down with up [sum of outputs, rank], is exactly a LoRA whose `lora_down` is
shared by the siblings and whose `lora_up` rows are split among them: member j adds
scale * up[rows_j] @ down(x). So training on diffusers' separate layers gives the file that
ComfyUI and sd-scripts expect (`lora_unet_double_blocks_0_img_attn_qkv`), with no conversion loss.

The down projection (with its dropouts) is computed once per input and reused by the other members,
so dropout masks are shared exactly as in the fused layer; module dropout skips all members together.
`MemberHooks` is that hook machinery (one computation per input, shared by the members), also used by
the LoHa/LoKr/DoRA modules of networks/weight_adapters.py.
"""

from __future__ import annotations

import torch
from torch import nn

from networks.lora_modules import LoRAModule


def row_ranges(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, stop) rows of each member in the fused weight, members stacked in order."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return [(offsets[j], offsets[j + 1]) for j in range(len(sizes))]


class MemberHooks:
    """Forward hooks on every member layer of a module (one layer, or a fused group reading one input).

    The first member to see an input computes `shared_value(x)` (None: skip the module this time) and the
    other members reuse it for the same input object; each member then adds `member_output(index, layer,
    x, value)` to its own output. Subclasses set `_original` (the member layers) and `row_ranges`."""

    _original: tuple
    _hook_handles: list
    _shared = None  # (input, value, members still to use it)

    def shared_value(self, x: torch.Tensor):
        raise NotImplementedError

    def member_output(self, index: int, layer: nn.Module, x: torch.Tensor, value) -> torch.Tensor:
        raise NotImplementedError

    @property
    def members(self) -> tuple:
        return self._original

    @property
    def is_attached(self) -> bool:
        return bool(self._hook_handles)

    def attach(self) -> None:
        if self.is_attached:
            raise RuntimeError(f"{self.lora_name} is already attached")
        for index, member in enumerate(self.members):
            self._hook_handles.append(member.register_forward_hook(self._member_hook(index), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._shared = None

    def _member_hook(self, index: int):
        def add_member_output(layer, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            value = self._value_for(x)
            if value is None:  # module dropout skipped this module for every member
                return output
            return output + self.member_output(index, layer, x, value).to(output.dtype)

        return add_member_output

    def _value_for(self, x: torch.Tensor):
        shared = self._shared
        if shared is not None and shared[0] is x:
            remaining = shared[2] - 1
            self._shared = (shared[0], shared[1], remaining) if remaining else None
            return shared[1]
        value = self.shared_value(x)
        remaining = len(self.members) - 1
        self._shared = (x, value, remaining) if remaining else None
        return value


class FusedLoRAModule(MemberHooks, LoRAModule):
    """kohya layout of the fused linear (`lora_down` [rank, in], `lora_up` [sum(out), rank], `alpha`)."""

    def __init__(self, lora_name: str, members: list[nn.Linear], rank: int, alpha: float, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__(lora_name, members[0], rank, alpha, multiplier, dropout, rank_dropout, module_dropout)
        self.out_features = [member.out_features for member in members]
        self.lora_up = nn.Linear(rank, sum(self.out_features), bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self._original = tuple(members)
        self.row_ranges = row_ranges(self.out_features)
        self._hook_handles = []

    def shared_value(self, x: torch.Tensor):
        """(down(x) with its dropouts, scale), or None when module dropout skips every member."""
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return None
        return self.down_projection(x)

    def member_output(self, index: int, layer: nn.Module, x: torch.Tensor, value) -> torch.Tensor:
        hidden, scale = value
        start, stop = self.row_ranges[index]
        return nn.functional.linear(hidden, self.lora_up.weight[start:stop]) * scale

    def member_delta_weights(self) -> list[torch.Tensor]:
        """The weight change of each member layer (multiplier included), in member order."""
        delta = self.delta_weight()
        return [delta[start:stop] for start, stop in self.row_ranges]
