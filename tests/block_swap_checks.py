"""Shared checks for the per-family block-swap tests: a host backend whose evicted weights are NaN (so a
block that runs without being resident poisons the output) and a replay of the swapper's event log
asserting that every block is resident when it runs and that no more than the budget is ever resident.
Test modules import `one_thread` to use it as their autouse fixture."""

import pytest
import torch

from library.offload import HostTransferBackend


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny models gain nothing from more, and a busy 2-core machine runs them many
    times slower with 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PoisonBackend(HostTransferBackend):
    def host_view(self, master):
        return torch.full_like(master, float("nan"))


def replay_events(events: list, group: str, num_blocks: int, budget: int) -> dict[str, int]:
    """Walk the event log of one block list; returns counts of loads, forward runs and recomputed runs."""
    resident, counts = set(), {"load": 0, "forward": 0, "backward": 0}
    for event in (e for e in events if e[1] == group):
        kind, block = event[0], event[2]
        assert 0 <= block < num_blocks
        if kind == "load":
            resident.add(block)
            counts["load"] += 1
            assert len(resident) <= budget, f"{sorted(resident)} resident, budget {budget}"
        elif kind == "evict":
            resident.discard(block)
        else:
            assert block in resident, f"{group} block {block} ran ({event[3]}) while not resident"
            counts[event[3]] += 1
    return counts
