"""Block swapping on CPU: the schedule's arithmetic, the swapper on a toy transformer through a host backend
(every block resident when it runs, never more than the budget resident, same loss and gradients as
without swapping, with and without gradient checkpointing, forward-only sampling), full fine-tuning
(weights and gradients copied back) and the user errors."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from library.errors import UserError
from library.offload import BlockSwapper, HostTransferBackend, SwapSchedule, check_blocks_to_swap, require_cuda


class PoisonBackend(HostTransferBackend):
    """Evicted parameters point at NaNs: a block that runs without being loaded poisons the result."""

    def host_view(self, master):
        return torch.full_like(master, float("nan"))


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x, context=None):
        hidden = torch.nn.functional.gelu(self.fc1(self.norm(x)))
        # a transposed view of the weight is what autograd saves here, not the parameter itself
        out = hidden @ self.fc2.weight.t() + self.fc2.bias
        return x + out + (0 if context is None else context)


class Toy(nn.Module):
    """Two block lists run in order, like FLUX's double and single blocks; `lora` trains, the blocks are frozen."""

    def __init__(self, first=5, second=4, width=8, checkpointing=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, width)
        self.first = nn.ModuleList(Block(width) for _ in range(first))
        self.second = nn.ModuleList(Block(width) for _ in range(second))
        self.out = nn.Linear(width, 4)
        self.lora = nn.Parameter(torch.randn(width) * 0.1)  # stands in for LoRA weights outside the blocks
        self.checkpointing = checkpointing

    def forward(self, x):
        h = self.embed(x) + self.lora
        context = h.mean(dim=1, keepdim=True)
        for block in self.first:
            h = checkpoint(block, h, context, use_reentrant=False) if self.checkpointing else block(h, context=context)
        for block in self.second:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointing else block(h)
        return self.out(h)


def loss_and_grads(model, x):
    loss = model(x).square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def frozen_toy(checkpointing=False):
    model = Toy(checkpointing=checkpointing)
    for block in list(model.first) + list(model.second):
        block.requires_grad_(False)
    return model


def replay(events, budgets):
    """Walk the event log: every run finds its block resident; residency never exceeds the budget."""
    resident = {name: set(range(budget)) for name, budget in budgets.items()}
    runs = []
    for event in events:
        kind, group, index = event[:3]
        if kind == "load":
            resident[group].add(index)
            assert len(resident[group]) <= budgets[group], (event, resident[group])
        elif kind == "evict":
            resident[group].discard(index)
        else:
            assert index in resident[group], f"{group} block {index} ran without being loaded"
            runs.append((group, index, event[3]))
    return runs, resident


def test_schedule_arithmetic():
    schedule = SwapSchedule(6, 4)  # two resident
    assert list(schedule.initial()) == [0, 1]
    assert [schedule.after_forward(i, needs_backward=True) for i in range(6)] == [
        (0, 2), (1, 3), (2, 4), (3, 5), None, None]
    assert [schedule.after_backward(i) for i in reversed(range(6))] == [(5, 3), (4, 2), (3, 1), (2, 0), None, None]
    # forward only: cyclic, ends where it started
    assert [schedule.after_forward(i, needs_backward=False) for i in range(6)] == [
        (0, 2), (1, 3), (2, 4), (3, 5), (4, 0), (5, 1)]
    assert SwapSchedule(4, 0).after_forward(0, False) is None


def test_user_errors():
    with pytest.raises(UserError, match="at most 3 of the 5"):
        check_blocks_to_swap(4, 5, "blocks")
    with pytest.raises(UserError, match="CUDA GPU, but this run trains on cpu"):
        require_cuda(torch.device("cpu"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_training_step_matches_and_follows_the_schedule(checkpointing):
    x = torch.randn(2, 3, 4)
    reference_loss, reference_grads = loss_and_grads(frozen_toy(checkpointing), x)
    model = frozen_toy(checkpointing)
    swapper = BlockSwapper(model, [("first", model.first, 3), ("second", model.second, 2)], PoisonBackend(),
                           record_events=True)
    for step in range(2):  # the second step starts from the state the first left
        model.zero_grad(set_to_none=True)
        start = len(swapper.events)
        loss, grads = loss_and_grads(model, x)
        assert torch.equal(loss, reference_loss)
        assert grads.keys() == reference_grads.keys() == {"lora", "embed.weight", "embed.bias", "out.weight", "out.bias"}
        for name in grads:
            torch.testing.assert_close(grads[name], reference_grads[name], rtol=0, atol=0)
        runs, resident = replay(swapper.events[start:], {"first": 2, "second": 2})
        assert resident == {"first": {0, 1}, "second": {0, 1}}
        forward = [(g, i) for g, i, phase in runs if phase == "forward"]
        assert forward == [("first", i) for i in range(5)] + [("second", i) for i in range(4)]
        recomputed = [(g, i) for g, i, phase in runs if phase == "backward"]
        expected = [("second", i) for i in reversed(range(4))] + [("first", i) for i in reversed(range(5))]
        assert recomputed == (expected if checkpointing else [])
    assert swapper.unscheduled_loads == 0
    loads = [e for e in swapper.events if e[0] == "load"]
    assert len(loads) == 2 + 2 + 2 * (3 + 3 + 2 + 2)  # initial residents, then per step: forward + backward


def test_forward_only_sampling_is_cyclic_and_exact():
    x = torch.randn(1, 3, 4)
    reference = frozen_toy()
    model = frozen_toy()
    swapper = BlockSwapper(model, [("first", model.first, 3), ("second", model.second, 2)], PoisonBackend(),
                           record_events=True)
    with torch.no_grad():
        for _ in range(3):  # sampling steps
            start = len(swapper.events)
            assert torch.equal(model(x), reference(x))
            _, resident = replay(swapper.events[start:], {"first": 2, "second": 2})
            assert resident == {"first": {0, 1}, "second": {0, 1}}
            moves = [e for e in swapper.events[start:] if e[0] == "load"]
            assert len(moves) == 5 + 4  # every block visits once per forward, no fix-up needed
    assert swapper.unscheduled_loads == 0


def test_full_finetune_copies_weights_and_gradients_back():
    x = torch.randn(2, 3, 4)
    reference, model = Toy(), Toy()
    BlockSwapper(model, [("first", model.first, 3), ("second", model.second, 2)], HostTransferBackend(),
                 trains_weights=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, model)]
    for _ in range(2):
        for m, optimizer in zip((reference, model), optimizers):
            optimizer.zero_grad()
            m(x).square().mean().backward()
            optimizer.step()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    swapped = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(swapped[name].data, p.data, rtol=0, atol=1e-7)


def test_two_forwards_before_one_backward_fetch_saved_weights_again():
    """Off the schedule (two graphs alive at once) the buffers are reused for other blocks before the first
    graph's backward; autograd kept references, not the buffers, so the gradients stay exact."""
    x1, x2 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    reference = frozen_toy()
    (reference(x1).square().mean() + reference(x2).square().mean()).backward()
    model = frozen_toy()
    swapper = BlockSwapper(model, [("first", model.first, 3), ("second", model.second, 2)], PoisonBackend())
    (model(x1).square().mean() + model(x2).square().mean()).backward()
    torch.testing.assert_close(model.lora.grad, reference.lora.grad, rtol=0, atol=0)
    assert swapper.unscheduled_loads > 0
