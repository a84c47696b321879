"""Optimizer steps inside the backward pass, and CPU-offloaded activation checkpoints, for full fine-tuning.

`--fused_backward_pass` (Adafactor) steps each parameter from a post-accumulate-grad hook as soon as its
gradient is complete, then drops that gradient, so the full set of gradients never exists at once.
`--blockwise_fused_optimizers` does the same per block (any optimizer): the denoiser's parameters are
split into one parameter group per block of the family's block lists (`ModelFamily.block_swap_groups`)
plus one for the rest, and a group steps when the last of its gradients arrives. Both use the run's one
optimizer and LR scheduler, stepping only part of it at a time (`step_only`), so saved states and
resume are those of a plain run. As in sd-scripts, `--max_grad_norm` clips each parameter's gradient on
its own (the total norm is never known), gradient accumulation and fp16 loss scaling are refused, and
so is more than one process (gradients would be stepped before they are averaged).
`--cpu_offload_checkpointing` keeps each checkpointed block's inputs in CPU memory between forward and
backward (`offloading_checkpoint`, passed to diffusers' `enable_gradient_checkpointing`).
Our own code: torch gives the hooks; no maintained library wires them to a diffusers training loop.
The flags work with `--blocks_to_swap` (library/offload.py): a swapped block's parameters are stepped
while the block is on the device, and its updated weights go back to the CPU with it.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Optional

from library.errors import UserError

logger = logging.getLogger(__name__)


def add_fused_backward_arguments(group) -> None:
    """The full fine-tuning flags of sd-scripts' flux_train.py / sd3_train.py / lumina_train.py / sdxl_train.py."""
    group.add_argument("--fused_backward_pass", action="store_true",
                       help="step Adafactor inside the backward pass, one parameter at a time, so the gradients of "
                            "the whole model never exist at once (needs --optimizer_type Adafactor)")
    group.add_argument("--blockwise_fused_optimizers", action="store_true",
                       help="step the optimizer inside the backward pass one transformer block at a time "
                            "(any optimizer; FLUX, SD3 and Lumina)")


def add_offload_checkpointing_argument(group) -> None:
    group.add_argument("--cpu_offload_checkpointing", action="store_true",
                       help="with gradient checkpointing, keep each block's saved inputs in CPU memory until the "
                            "backward pass needs them (implies --gradient_checkpointing)")


def fused_flag(args: argparse.Namespace) -> Optional[str]:
    """The fused-step flag a run uses, or None (the flags exist in full fine-tuning runs only, hence getattr)."""
    for flag in ("fused_backward_pass", "blockwise_fused_optimizers"):
        if getattr(args, flag, False):
            return flag
    return None


def validate_memory_args(args: argparse.Namespace, has_block_lists: bool) -> None:
    """Reject combinations the fused step or the offloaded checkpoints cannot honour (before any model loads)."""
    if args.cpu_offload_checkpointing and getattr(args, "blocks_to_swap", None):  # a flag of FLUX/SD3/Lumina only
        raise UserError("--cpu_offload_checkpointing cannot be combined with --blocks_to_swap (as in sd-scripts): "
                        "choose one")
    flag = fused_flag(args)
    if flag is None:
        return
    if args.fused_backward_pass and args.blockwise_fused_optimizers:
        raise UserError("--fused_backward_pass and --blockwise_fused_optimizers are two ways of the same thing: "
                        "choose one")
    if args.fused_backward_pass and args.optimizer_type.lower().rpartition(".")[2] != "adafactor":
        raise UserError(f"--fused_backward_pass steps Adafactor only (got --optimizer_type {args.optimizer_type}); "
                        "use --optimizer_type Adafactor, or --blockwise_fused_optimizers for other optimizers")
    if args.blockwise_fused_optimizers and not has_block_lists:
        raise UserError("--blockwise_fused_optimizers needs a transformer with block lists (FLUX.1, SD3, Lumina 2); "
                        "use --fused_backward_pass here")
    if args.gradient_accumulation_steps > 1:
        raise UserError(f"--{flag} steps during each backward pass, so it cannot accumulate gradients: "
                        "remove --gradient_accumulation_steps (or the fused step)")
    if args.mixed_precision == "fp16":
        raise UserError(f"--{flag} cannot step through fp16 loss scaling: use --mixed_precision bf16")


def checkpointing_function(args: argparse.Namespace):
    """The function diffusers' enable_gradient_checkpointing should use (None: its default)."""
    return offloading_checkpoint if args.cpu_offload_checkpointing else None


def offloading_checkpoint(module, *args):
    """torch's non-reentrant checkpoint of `module(*args)` whose saved inputs live in CPU memory: the tensors
    among args go to the CPU (differentiably, so their gradients come back to the device) and are copied to
    the device again for the forward and for its recomputation in backward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) != 1:
        return checkpoint(module.__call__, *args, use_reentrant=False)
    device = devices.pop()  # on a CPU run the moves are no-ops and this is torch's checkpoint
    non_blocking = device.type == "cuda"

    def run(*held):
        return module(*[a.to(device, non_blocking=non_blocking) if isinstance(a, torch.Tensor) else a for a in held])

    held = [a.to("cpu") if isinstance(a, torch.Tensor) else a for a in args]
    return checkpoint(run, *held, use_reentrant=False)


def step_only(optimizer, group_index: int, params: list) -> None:
    """optimizer.step() over `params` of param group `group_index` alone (the other parameters are not
    seen, so their state is untouched); optimizer state follows each parameter's current device."""
    group = optimizer.param_groups[group_index]
    for param in params:
        _state_to_device(optimizer.state.get(param), param.device)
    all_groups, all_params = optimizer.param_groups, group["params"]
    optimizer.param_groups, group["params"] = [group], params
    try:
        optimizer.step()
    finally:
        optimizer.param_groups, group["params"] = all_groups, all_params


def _state_to_device(state: Optional[dict], device) -> None:
    """A swapped block's state was loaded (resume) where its weights were then; it steps where they are now."""
    import torch

    for key, value in (state or {}).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != device:
            state[key] = value.to(device)


def block_param_groups(param_groups: list[dict], block_lists: list) -> list[dict]:
    """The first group (the denoiser's) split into one group per block of `block_lists` and one for the rest
    of the denoiser, each with the first group's options; later groups (text encoders) stay as they are."""
    first, *others = param_groups
    options = {k: v for k, v in first.items() if k != "params"}
    trained = {id(p) for p in first["params"]}
    groups, seen = [], set()
    for blocks in block_lists:
        for block in blocks:
            params = [p for p in block.parameters() if id(p) in trained and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({**options, "params": params})
    rest = [p for p in first["params"] if id(p) not in seen]
    return groups + ([{**options, "params": rest}] if rest else []) + list(others)


class FusedStep:
    """The optimizer step run from gradient hooks during backward (one run's)."""

    def __init__(self, args: argparse.Namespace, blockwise: bool):
        self.max_grad_norm = args.max_grad_norm or 0.0
        self.blockwise = blockwise
        self.optimizer = None
        self.armed = True  # False: this step's loss is not finite; gradients are dropped unstepped
        self.pending: dict[int, int] = {}  # group -> gradients arrived this step (blockwise)
        self.sizes: list[int] = []  # trained parameters per group
        self._handles: list = []

    def param_groups(self, groups: list[dict], family, components) -> list[dict]:
        """The optimizer's parameter groups: one per block of the family's block lists when blockwise."""
        if not self.blockwise:
            return groups
        lists = [blocks for _, blocks, _ in family.block_swap_groups(components.denoiser, 0)]
        return block_param_groups(groups, lists)

    def attach(self, optimizer, num_processes: int) -> None:
        """Hook every trained parameter of `optimizer` (the raw one, before accelerate wraps it)."""
        if num_processes > 1:
            flag = "blockwise_fused_optimizers" if self.blockwise else "fused_backward_pass"
            raise UserError(f"--{flag} trains on one process only (it steps before gradients are averaged "
                            "across processes): launch one process or drop the flag")
        self.optimizer = optimizer
        self.sizes = [sum(1 for p in group["params"] if p.requires_grad) for group in optimizer.param_groups]
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._hook(index)))

    def _hook(self, index: int):
        def hook(param) -> None:
            if self.blockwise:
                self._block_gradient_arrived(index)
            else:
                if self.armed:
                    self._clip([param])
                    step_only(self.optimizer, index, [param])
                param.grad = None

        return hook

    def _block_gradient_arrived(self, index: int) -> None:
        self.pending[index] = self.pending.get(index, 0) + 1
        if self.pending[index] == self.sizes[index]:
            self._step_group(index)

    def _step_group(self, index: int) -> None:
        params = [p for p in self.optimizer.param_groups[index]["params"] if p.grad is not None]
        if self.armed and params:
            self._clip(params)
            step_only(self.optimizer, index, params)
        for param in params:
            param.grad = None
        self.pending.pop(index, None)

    def _clip(self, params: list) -> None:
        import torch

        if self.max_grad_norm:
            for param in params:  # sd-scripts clips each parameter's gradient on its own
                torch.nn.utils.clip_grad_norm_(param, self.max_grad_norm)

    def arm(self, loss_value: float) -> None:
        """Before backward: step only when the loss is finite (a NaN step is dropped, as the plain step does)."""
        self.armed = math.isfinite(loss_value)

    def finish(self) -> None:
        """After backward: step the block groups some of whose parameters got no gradient this step
        (drop their gradients when the loss was not finite)."""
        for index in list(self.pending):
            self._step_group(index)
        self.armed = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def fused_step_for(args: argparse.Namespace) -> Optional[FusedStep]:
    """The run's fused step (None: the plain optimizer step after backward)."""
    flag = fused_flag(args)
    if flag is None:
        return None
    logger.info("--%s: the optimizer steps inside the backward pass", flag)
    return FusedStep(args, blockwise=flag == "blockwise_fused_optimizers")
