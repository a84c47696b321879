"""Block swapping (`--blocks_to_swap N`): N transformer blocks live in CPU memory and visit the GPU just in time.

Our own code: no maintained library swaps blocks around both forward and backward. `SwapSchedule`
is the pure arithmetic of which block moves when; `BlockSwapper` applies it to a model through hooks;
a `TransferBackend` performs the copies (`CudaTransferBackend` on a side stream overlapped with compute,
`HostTransferBackend` between CPU tensors, for tests and CPU benchmarks of the bookkeeping).
Families use it through one hook, `ModelFamily.block_swap_groups` (which block lists swap, how many of
each); the flag (`add_blocks_to_swap_argument`), its check (`validated_blocks_to_swap`), placement
(`place_with_block_swap`) and `enable_block_swap` are written here once.

Schedule, for one list of n blocks with N swapped and R = n - N resident at a time:
- before each forward blocks 0..R-1 are on the device (re-established if a step did not end that way);
- forward, after block i ran: if i < N, evict i and load i + R; a later block whose output needs no
  backward (no grad, or nothing before it trains) is evicted at once and block i - N loaded (the cyclic
  forward-only schedule used for sampling and validation);
- backward, when block j's backward is done (its inputs got their gradients) and j >= R: evict j,
  load j - R. Every load is issued R - 1 blocks before the block runs, and at most R blocks hold
  device memory at any time.
Weights of resident blocks sit in device buffers reused from block to block. For a frozen base (LoRA)
a pinned CPU master of every block is kept and only host-to-device copies happen; with
`trains_weights` (full fine-tuning) an evicted block's weights and gradients are copied back first.
Autograd must not keep a swapped block's weights alive between forward and backward: while the
model runs, weights that autograd saves are stored as references to their block and fetched again
(after waiting for the block) when backward needs them. Under gradient checkpointing nothing is saved
and the recomputation waits for its block like a forward does.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from library.errors import UserError

logger = logging.getLogger(__name__)


def require_cuda(device) -> None:
    if getattr(device, "type", str(device)) != "cuda":
        raise UserError(f"--blocks_to_swap moves blocks between CPU and a CUDA GPU, but this run trains on "
                        f"{device}; remove --blocks_to_swap (or train on a CUDA GPU)")


def check_blocks_to_swap(blocks_to_swap: int, num_blocks: int, what: str) -> None:
    """At least two blocks must stay on the device: one running while the next one arrives."""
    if not 0 <= blocks_to_swap <= num_blocks - 2:
        raise UserError(f"--blocks_to_swap: {blocks_to_swap} {what} requested, but at most {max(0, num_blocks - 2)} "
                        f"of the {num_blocks} can be swapped (two stay on the GPU)")


def add_blocks_to_swap_argument(group, what: str) -> None:
    """The --blocks_to_swap flag of a family that can swap `what` ("transformer blocks", ...)."""
    group.add_argument("--blocks_to_swap", type=int, default=None,
                       help=f"keep this many {what} in CPU memory, moving them to the GPU when needed")


def validated_blocks_to_swap(blocks_to_swap: Optional[int]) -> int:
    """--blocks_to_swap checked before any model loads (0 or more; a CUDA GPU when set); None -> 0."""
    if blocks_to_swap is not None and blocks_to_swap < 0:
        raise UserError(f"--blocks_to_swap must be 0 or more (got {blocks_to_swap})")
    if blocks_to_swap:
        import torch

        require_cuda("cuda" if torch.cuda.is_available() else "cpu")  # fail before loading the model
    return blocks_to_swap or 0


def enable_block_swap(root, groups: Sequence[tuple[str, Sequence, int]], backend: "TransferBackend",
                      trains_weights: bool = False, record_events: bool = False) -> "BlockSwapper":
    """Swap the blocks of `groups` ((name, block list, how many to swap) per list) of a model whose
    other parts are already on backend.device; logs what stays in CPU memory."""
    swapper = BlockSwapper(root, groups, backend, trains_weights=trains_weights, record_events=record_events)
    kept = ", ".join(f"{count} of {len(blocks)} {name}" for name, blocks, count in groups)
    logger.info("block swap: %s blocks stay in CPU memory (%.2f GB less VRAM)", kept, swapper.swapped_bytes() / 1e9)
    return swapper


def place_with_block_swap(root, groups: Sequence[tuple[str, Sequence, int]], backend: "TransferBackend",
                          trains_weights: bool = False) -> "BlockSwapper":
    """For a model held in CPU memory: every child but the swapped block lists to backend.device,
    then the swap of those lists."""
    swapped = [blocks for _, blocks, _ in groups]
    for child in root.children():
        if not any(child is blocks for blocks in swapped):
            child.to(backend.device)
    return enable_block_swap(root, groups, backend, trains_weights=trains_weights)


class SwapSchedule:
    """Which block of a list moves when; blocks are numbered in forward order."""

    def __init__(self, num_blocks: int, blocks_to_swap: int):
        check_blocks_to_swap(blocks_to_swap, num_blocks, "blocks")
        self.num_blocks, self.swapped = num_blocks, blocks_to_swap
        self.resident = num_blocks - blocks_to_swap

    def initial(self) -> range:
        return range(self.resident)

    def after_forward(self, index: int, needs_backward: bool) -> Optional[tuple[int, int]]:
        """(evict, load) after block `index` ran forward, or None."""
        if not self.swapped:
            return None
        if index < self.swapped:
            return index, index + self.resident
        return None if needs_backward else (index, index - self.swapped)

    def after_backward(self, index: int) -> Optional[tuple[int, int]]:
        """(evict, load) once block `index`'s backward is done, or None."""
        if self.swapped and index >= self.resident:
            return index, index - self.resident
        return None


# ---- transfer backends ------------------------------------------------------------------------------

class TransferBackend(ABC):
    """Copies between host memory and the training device; uploads may run asynchronously."""

    device: Any

    @abstractmethod
    def make_master(self, tensor):
        """The host copy a block's tensor lives in while the block is not on the device."""

    @abstractmethod
    def allocate(self, like):
        """A device buffer shaped like the host tensor `like`."""

    @abstractmethod
    def upload(self, copies: list[tuple]):
        """Copy each (device buffer, host tensor) pair; returns a ticket for wait()."""

    @abstractmethod
    def download(self, copies: list[tuple]) -> None:
        """Copy each (host tensor, device tensor) pair, after the compute that wrote them."""

    def host_view(self, master):
        """What an evicted block's parameter points at (the master; test backends may poison it)."""
        return master

    def wait(self, ticket) -> None:
        """Make the computation wait until the upload behind `ticket` is complete."""

    def release(self, buffers: list) -> None:
        """The computation has finished with these buffers; later uploads may overwrite them."""

    def synchronize(self) -> None:
        """Wait for every transfer (host tensors are read by the optimizer after backward)."""


class HostTransferBackend(TransferBackend):
    """'Device' buffers are separate CPU tensors: every move is a real copy, done at once."""

    device = "cpu"

    def make_master(self, tensor):
        return tensor.detach().clone()

    def allocate(self, like):
        import torch

        return torch.empty_like(like)

    def upload(self, copies):
        for buffer, host in copies:
            buffer.copy_(host)
        return None

    def download(self, copies):
        for host, buffer in copies:
            host.copy_(buffer)


class CudaTransferBackend(TransferBackend):
    """Pinned host masters; uploads on a side stream that waits for the compute using the reused buffers."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self._released = None  # event: compute finished with the most recently released buffers

    def make_master(self, tensor):
        return tensor.detach().to("cpu").pin_memory()

    def allocate(self, like):
        import torch

        return torch.empty(like.shape, dtype=like.dtype, device=self.device)

    def release(self, buffers):
        import torch

        self._released = torch.cuda.Event()
        self._released.record(torch.cuda.current_stream(self.device))

    def upload(self, copies):
        import torch

        with torch.cuda.stream(self.stream):
            if self._released is not None:
                self.stream.wait_event(self._released)
            for buffer, host in copies:
                buffer.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def download(self, copies):
        import torch

        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            for host, buffer in copies:
                host.copy_(buffer, non_blocking=True)

    def wait(self, ticket):
        import torch

        if ticket is not None:
            torch.cuda.current_stream(self.device).wait_event(ticket)

    def synchronize(self):
        self.stream.synchronize()


# ---- the swapper ------------------------------------------------------------------------------------

@dataclass
class _Block:
    params: list  # the block's parameters, in a fixed order
    masters: list  # host copies
    buffers: Optional[list] = None  # device buffers while resident (or arriving)
    grad_masters: Optional[list] = None
    ticket: Any = None

    @property
    def resident(self) -> bool:
        return self.buffers is not None


@dataclass(frozen=True)
class _WeightRef:
    """What autograd keeps instead of a swapped block's weight (fetched again in backward)."""

    group: int
    block: int
    param: int
    size: tuple
    stride: tuple
    offset: int


class _BufferPool:
    def __init__(self, backend: TransferBackend):
        self.backend, self.free = backend, {}

    def take(self, master):
        stack = self.free.get((tuple(master.shape), master.dtype))
        return stack.pop() if stack else self.backend.allocate(master)

    def give(self, buffer) -> None:
        self.free.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)


class _BackwardDone:
    """An identity on a block's inputs whose backward reports that the block's backward is over."""

    function = None

    @classmethod
    def apply(cls, callback: Callable[[], None], tensors: list):
        if cls.function is None:
            import torch

            class Function(torch.autograd.Function):
                @staticmethod
                def forward(ctx, report, *inputs):
                    ctx.report = report
                    return tuple(t.view_as(t) for t in inputs)

                @staticmethod
                def backward(ctx, *grads):
                    ctx.report()
                    return (None, *grads)

            cls.function = Function
        return cls.function.apply(callback, *tensors)


class BlockSwapper:
    """Swaps `blocks_to_swap` of each named block list of `root` (a model whose forward runs them in order).

    `groups`: (name, blocks, blocks_to_swap). Parameters of the blocks are managed here; everything else
    of `root` must already be on the device. `events` (with record_events) logs ("load"|"evict", group,
    block) and ("run", group, block, "forward"|"backward") for tests of the schedule.
    """

    def __init__(self, root, groups: Sequence[tuple[str, Sequence, int]], backend: TransferBackend,
                 trains_weights: bool = False, record_events: bool = False):
        self.root, self.backend, self.trains_weights = root, backend, trains_weights
        self.names = [name for name, _, _ in groups]
        self.modules = [list(blocks) for _, blocks, _ in groups]
        self.schedules = [SwapSchedule(len(blocks), n) for _, blocks, n in groups]
        self.pools = [_BufferPool(backend) for _ in groups]
        self.events: Optional[list] = [] if record_events else None
        self.unscheduled_loads = 0
        self._owners: dict[int, tuple[int, int, int]] = {}  # buffer storage pointer -> (group, block, param)
        self._phase = "idle"
        self._saved_tensor_hooks = None
        self._end_of_backward_queued = False
        self.blocks = [[self._set_up_block(g, i, block) for i, block in enumerate(blocks)]
                       for g, blocks in enumerate(self.modules)]
        self._handles = self._register_hooks()

    # ----- set-up ------------------------------------------------------------------------------
    def _set_up_block(self, group: int, index: int, module) -> _Block:
        params = [p for p in module.parameters()]
        masters = [self.backend.make_master(p.data) for p in params]
        state = _Block(params=params, masters=masters)
        for param, master in zip(params, masters):
            param.data = self.backend.host_view(master)
        for buffer_name, buffer in list(module.named_buffers()):
            owner = module.get_submodule(buffer_name.rpartition(".")[0]) if "." in buffer_name else module
            setattr(owner, buffer_name.rpartition(".")[2], buffer.to(self.backend.device))
        if index in self.schedules[group].initial():
            self._load(group, index, state)
        return state

    def _register_hooks(self) -> list:
        handles = [self.root.register_forward_pre_hook(self._before_model),
                   self.root.register_forward_hook(self._after_model, always_call=True)]
        for g, blocks in enumerate(self.modules):
            for i, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(self._pre_block_hook(g, i), with_kwargs=True))
                handles.append(block.register_forward_hook(self._post_block_hook(g, i)))
        return handles

    def remove(self) -> None:
        """Remove the hooks (the blocks stay where they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def swapped_bytes(self) -> int:
        """Device memory the swap saves: the weights of the blocks not resident at once."""
        total = 0
        for g, blocks in enumerate(self.blocks):
            sizes = sorted((sum(m.numel() * m.element_size() for m in b.masters) for b in blocks), reverse=True)
            total += sum(sizes[: self.schedules[g].swapped])
        return total

    def resident_blocks(self, group: int) -> list[int]:
        return [i for i, block in enumerate(self.blocks[group]) if block.resident]

    # ----- moves -------------------------------------------------------------------------------
    def _log(self, *event) -> None:
        if self.events is not None:
            self.events.append(event)

    def _load(self, group: int, index: int, state: Optional[_Block] = None) -> None:
        state = state or self.blocks[group][index]
        if state.resident:
            return
        pool = self.pools[group]
        state.buffers = [pool.take(master) for master in state.masters]
        copies = list(zip(state.buffers, state.masters))
        for k, (param, buffer) in enumerate(zip(state.params, state.buffers)):
            param.data = buffer
            self._owners[buffer.untyped_storage().data_ptr()] = (group, index, k)
        if self.trains_weights and state.grad_masters:
            for param, grad in zip(state.params, state.grad_masters):
                if grad is not None and param.grad is not None:
                    device_grad = self.backend.allocate(grad)
                    copies.append((device_grad, grad))
                    param.grad = device_grad
        state.ticket = self.backend.upload(copies)
        self._log("load", self.names[group], index)

    def _evict(self, group: int, index: int) -> None:
        state = self.blocks[group][index]
        if not state.resident:
            return
        self.backend.release(state.buffers)
        if self.trains_weights:
            self._download(state)
        for param, master, buffer in zip(state.params, state.masters, state.buffers):
            param.data = self.backend.host_view(master)
            self._owners.pop(buffer.untyped_storage().data_ptr(), None)
            self.pools[group].give(buffer)
        state.buffers, state.ticket = None, None
        self._log("evict", self.names[group], index)

    def _download(self, state: _Block) -> None:
        copies = [(master, param.data) for param, master in zip(state.params, state.masters)]
        if state.grad_masters is None:
            state.grad_masters = [None] * len(state.params)
        for k, param in enumerate(state.params):
            if param.grad is None:
                continue
            if state.grad_masters[k] is None:
                state.grad_masters[k] = self.backend.make_master(param.grad)
            else:
                copies.append((state.grad_masters[k], param.grad))
            param.grad = state.grad_masters[k]
        self.backend.download(copies)

    def _move(self, group: int, move: Optional[tuple[int, int]]) -> None:
        if move is not None:
            self._evict(group, move[0])
            self._load(group, move[1])

    def _ensure_resident(self, group: int, index: int) -> None:
        state = self.blocks[group][index]
        if not state.resident:  # only when a step left the schedule (e.g. two forwards before a backward)
            self.unscheduled_loads += 1
            if self.unscheduled_loads == 1:
                logger.warning("block swap: %s block %d was needed before it was scheduled; loading it now",
                               self.names[group], index)
            self._load(group, index)
        if state.ticket is not None:
            self.backend.wait(state.ticket)
            state.ticket = None

    # ----- hooks -------------------------------------------------------------------------------
    def _before_model(self, module, args) -> None:
        import torch

        for g, schedule in enumerate(self.schedules):  # the state every forward starts from
            wanted = set(schedule.initial())
            for i in range(schedule.num_blocks):
                if i not in wanted:
                    self._evict(g, i)
            for i in sorted(wanted):
                self._load(g, i)
        self._phase = "forward"
        self._saved_tensor_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_tensor_hooks.__enter__()

    def _after_model(self, module, args, output) -> None:
        import torch

        if self._saved_tensor_hooks is not None:
            self._saved_tensor_hooks.__exit__(None, None, None)
            self._saved_tensor_hooks = None
        self._phase = "backward" if torch.is_grad_enabled() else "idle"
        self._end_of_backward_queued = False

    def _pre_block_hook(self, group: int, index: int):
        def hook(module, args, kwargs):
            import torch

            self._ensure_resident(group, index)
            self._log("run", self.names[group], index, "forward" if self._phase == "forward" else "backward")
            if not torch.is_grad_enabled():
                return None
            return _with_backward_report(args, kwargs, lambda: self._block_backward_done(group, index))

        return hook

    def _post_block_hook(self, group: int, index: int):
        def hook(module, args, output):
            import torch

            if self._phase != "forward":
                return None  # a recomputation under gradient checkpointing
            needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(output))
            self._move(group, self.schedules[group].after_forward(index, needs_backward))
            return None

        return hook

    def _block_backward_done(self, group: int, index: int) -> None:
        import torch

        if self._phase != "backward":
            return
        if self.trains_weights and not self._end_of_backward_queued:
            self._end_of_backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.backend.synchronize)
        self._move(group, self.schedules[group].after_backward(index))

    # ----- autograd's saved weights --------------------------------------------------------------
    def _pack(self, tensor):
        if tensor.device.type == "meta" or not self._owners:
            return tensor
        owner = self._owners.get(tensor.untyped_storage().data_ptr())
        if owner is None:
            return tensor
        return _WeightRef(*owner, tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset())

    def _unpack(self, packed):
        if not isinstance(packed, _WeightRef):
            return packed
        self._ensure_resident(packed.group, packed.block)
        buffer = self.blocks[packed.group][packed.block].buffers[packed.param]
        return buffer.as_strided(packed.size, packed.stride, packed.offset)


def _tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _with_backward_report(args: tuple, kwargs: dict, report: Callable[[], None]):
    """(args, kwargs) with the top-level tensors that need gradients passed through _BackwardDone."""
    import torch

    positions = [("arg", i) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    positions += [("kw", k) for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if not positions:
        return None
    values = [args[key] if kind == "arg" else kwargs[key] for kind, key in positions]
    reported = _BackwardDone.apply(report, values)
    args, kwargs = list(args), dict(kwargs)
    for (kind, key), tensor in zip(positions, reported):
        if kind == "arg":
            args[key] = tensor
        else:
            kwargs[key] = tensor
    return tuple(args), kwargs
