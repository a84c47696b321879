"""One LoRA module over several sibling Linears that a checkpoint layout fuses into one tensor.

BFL's FLUX files hold q, k and v (in single blocks also the MLP input) as one `qkv`/`linear1` linear,
where diffusers has separate layers reading the same input. A LoRA on the fused linear,
W_fused += scale * up @ down with up [sum of outputs, rank], is exactly a LoRA whose `lora_down` is
shared by the siblings and whose `lora_up` rows are split among them: member j adds
scale * up[rows_j] @ down(x). So training on diffusers' separate layers gives the file that
ComfyUI and sd-scripts expect (`lora_unet_double_blocks_0_img_attn_qkv`), with no conversion loss.

The down projection (with its dropouts) is computed once per input and reused by the other members,
so dropout masks are shared exactly as in the fused layer; module dropout skips all members together.
"""

from __future__ import annotations

import torch
from torch import nn

from networks.lora_modules import LoRAModule


class FusedLoRAModule(LoRAModule):
    """kohya layout of the fused linear (`lora_down` [rank, in], `lora_up` [sum(out), rank], `alpha`)."""

    def __init__(self, lora_name: str, members: list[nn.Linear], rank: int, alpha: float, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__(lora_name, members[0], rank, alpha, multiplier, dropout, rank_dropout, module_dropout)
        self.out_features = [member.out_features for member in members]
        self.lora_up = nn.Linear(rank, sum(self.out_features), bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self._original = tuple(members)
        offsets = [0]
        for size in self.out_features:
            offsets.append(offsets[-1] + size)
        self.row_ranges = [(offsets[j], offsets[j + 1]) for j in range(len(members))]
        self._hook_handles: list = []
        self._shared = None  # (input, hidden, scale or None when module-dropped, members still to use it)

    @property
    def members(self) -> tuple:
        return self._original

    @property
    def is_attached(self) -> bool:
        return bool(self._hook_handles)

    def attach(self) -> None:
        if self.is_attached:
            raise RuntimeError(f"LoRA {self.lora_name} is already attached")
        for index, member in enumerate(self.members):
            self._hook_handles.append(member.register_forward_hook(self._member_hook(index), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._shared = None

    def _member_hook(self, index: int):
        def add_lora_rows(layer, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            hidden, scale = self._shared_down_projection(x)
            if scale is None:  # module dropout skipped this module for every member
                return output
            start, stop = self.row_ranges[index]
            delta = nn.functional.linear(hidden, self.lora_up.weight[start:stop]) * scale
            return output + delta.to(output.dtype)

        return add_lora_rows

    def _shared_down_projection(self, x: torch.Tensor):
        shared = self._shared
        if shared is not None and shared[0] is x:
            remaining = shared[3] - 1
            self._shared = (shared[0], shared[1], shared[2], remaining) if remaining else None
            return shared[1], shared[2]
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            hidden, scale = None, None
        else:
            hidden, scale = self.down_projection(x)
        remaining = len(self.members) - 1
        self._shared = (x, hidden, scale, remaining) if remaining else None
        return hidden, scale

    def member_delta_weights(self) -> list[torch.Tensor]:
        """The weight change of each member layer (multiplier included), in member order."""
        delta = self.delta_weight()
        return [delta[start:stop] for start, stop in self.row_ranges]
