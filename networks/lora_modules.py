"""One LoRA adapter per layer, and the search for the layers a `LoraTarget` gives LoRA to.

`LoRAModule` holds the low-rank pair of one Linear or Conv2d layer: `lora_down` (in -> rank, same
kernel, stride and padding as the layer) and `lora_up` (rank -> out, 1x1), and the `alpha` buffer,
so its state dict is exactly the kohya key layout (`lora_down.weight`, `lora_up.weight`, `alpha`).
It attaches to the original layer with a forward hook: the layer's own weights stay untouched and
its output becomes `layer(x) + up(down(x)) * multiplier * alpha / rank`. Neuron dropout (on the
down output), rank dropout and module dropout act only in training mode.

`find_lora_layers` walks a target the way sd-scripts does: every Linear and 1x1 Conv2d inside a
container class gets LoRA; with conv_dim, the 3x3-conv containers join the containers and every
larger-kernel Conv2d gets a LoRA of rank conv_dim. Linears a target lists in `fused_groups` form one
FoundLayer with `members` (one LoRA module for all of them, networks/lora_fused.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from library.families.base import LoraTarget


@dataclass
class FoundLayer:
    """A layer a LoRA goes on: its path under the target's root and whether it is a k x k conv."""

    path: str
    layer: nn.Module
    is_conv3x3: bool  # any Conv2d with a kernel larger than 1x1 (trained with conv_dim/conv_alpha)
    members: tuple = ()  # (path, Linear) pairs one fused LoRA module covers; path/layer are the first


def _layer_kind(module: nn.Module) -> str | None:
    """"linear", "conv1x1", "conv" (larger kernel) or None when LoRA does not apply."""
    if isinstance(module, nn.MultiheadAttention) or type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return None  # nn.MultiheadAttention reads out_proj.weight directly, so a hook would never run
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None  # a grouped conv's delta cannot be written as one up @ down product
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    return None


def find_lora_layers(target: LoraTarget, with_conv3x3: bool) -> list[FoundLayer]:
    """The layers of `target` that get LoRA, in module order, each once."""
    containers = set(target.container_classes)
    if with_conv3x3:
        containers |= set(target.conv3x3_container_classes)
    found: list[FoundLayer] = []
    seen: set[int] = set()
    for container_path, container in target.root.named_modules():
        if type(container).__name__ not in containers:
            continue
        fused = _fused_layers(container, container_path, target.fused_groups.get(type(container).__name__, ()))
        for child_path, child in container.named_modules():
            kind = _layer_kind(child)
            if kind is None or id(child) in seen or (kind == "conv" and not with_conv3x3):
                continue
            if id(child) in fused:  # the group's first member to come up stands for all of them
                group = fused[id(child)]
                seen.update(id(layer) for _, layer in group.members)
                found.append(group)
                continue
            seen.add(id(child))
            path = ".".join(part for part in (container_path, child_path) if part)
            found.append(FoundLayer(path=path, layer=child, is_conv3x3=kind == "conv"))
    return found


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False


def _fused_layers(container: nn.Module, container_path: str, groups) -> dict[int, FoundLayer]:
    """id(member Linear) -> the FoundLayer of its fused group, for the groups this container has."""
    by_member: dict[int, FoundLayer] = {}
    for group in groups:
        if not all(_has_submodule(container, relative) for relative in group):
            continue  # a group only some containers have (SD3.5's attn2 is in its dual-attention blocks only)
        members = []
        for relative in group:
            layer = container.get_submodule(relative)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"fused LoRA group member {relative} of {container_path} is not a Linear")
            members.append((".".join(p for p in (container_path, relative) if p), layer))
        if len({layer.in_features for _, layer in members}) != 1:
            raise ValueError(f"fused LoRA group {group} of {container_path} has members with different inputs")
        found = FoundLayer(path=members[0][0], layer=members[0][1], is_conv3x3=False, members=tuple(members))
        by_member.update({id(layer): found for _, layer in members})
    return by_member


class LoRAModule(nn.Module):
    """The trainable low-rank update of one Linear or Conv2d layer (kohya layout)."""

    def __init__(
        self, lora_name: str, original: nn.Module, rank: int, alpha: float, multiplier: float = 1.0,
        dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.rank = rank
        self.is_conv = isinstance(original, nn.Conv2d)
        if self.is_conv:
            self.lora_down = nn.Conv2d(
                original.in_channels, rank, original.kernel_size, original.stride, original.padding,
                dilation=original.dilation, bias=False,
            )
            self.lora_up = nn.Conv2d(rank, original.out_channels, (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(original.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, original.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)  # a fresh LoRA leaves the model's output unchanged

        alpha = float(rank if not alpha else alpha)  # sd-scripts: alpha 0 or None means alpha = rank
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / rank
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # A tuple keeps the original layer out of this module's children, so its weights never
        # appear in our state dict or parameters.
        self._original = (original,)
        self._hook_handle = None

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    @property
    def is_attached(self) -> bool:
        return self._hook_handle is not None

    def attach(self) -> None:
        if self.is_attached:
            raise RuntimeError(f"LoRA {self.lora_name} is already attached")
        self._hook_handle = self.original.register_forward_hook(self._add_lora_output, with_kwargs=True)

    def detach(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    def _add_lora_output(self, layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return output
        x = args[0] if args else kwargs["input"]  # nn.Linear/Conv2d name their only input `input`
        return output + self.lora_delta(x).to(output.dtype)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """up(down(x)) * multiplier * scale, with the training-time dropouts."""
        hidden, scale = self.down_projection(x)
        return self.lora_up(hidden) * scale

    def down_projection(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(down(x) after the neuron and rank dropouts, the scale its up projection is multiplied by)."""
        hidden = self.lora_down(x.to(self.lora_down.weight.dtype))
        scale = self.scale * self.multiplier
        if self.training and self.dropout:
            hidden = nn.functional.dropout(hidden, p=self.dropout)
        if self.training and self.rank_dropout:
            hidden = hidden * self._rank_keep_mask(hidden)
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        return hidden, scale

    def _rank_keep_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """One keep/drop draw per sample and rank channel, broadcast over tokens or pixels."""
        keep = torch.rand(hidden.shape[0], self.rank, device=hidden.device) > self.rank_dropout
        if self.is_conv:  # (batch, rank, height, width)
            shape = (hidden.shape[0], self.rank) + (1,) * (hidden.dim() - 2)
        else:  # (batch, ..., rank)
            shape = (hidden.shape[0],) + (1,) * (hidden.dim() - 2) + (self.rank,)
        return keep.to(hidden.dtype).view(shape)

    def delta_weight(self) -> torch.Tensor:
        """The weight change this LoRA stands for (multiplier included), shaped like the layer's weight."""
        up = self.lora_up.weight.float()
        down = self.lora_down.weight.float()
        if self.is_conv:
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            delta = up @ down
        return delta * (self.scale * self.multiplier)
