"""Shared by the benchmarks: time a real training run in-process, and per-step time by difference.

The per-step figure is (time of a long run - time of a short run) / extra steps, so model loading
and caching cancel out and only the training loop remains.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed_training(family: str, argv: list[str]) -> float:
    """Seconds for one in-process training run (fresh accelerate state, as a new process would have)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from library.cli import run_training

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    start = time.perf_counter()
    run_training(family, "network", argv)
    return time.perf_counter() - start


def seconds_per_step(family: str, argv_for_steps, short: int, long: int, repeats: int = 2) -> float:
    """argv_for_steps(steps, tag) -> argv; best of `repeats` for each length, then the difference per step."""
    short_time = min(timed_training(family, argv_for_steps(short, f"s{i}")) for i in range(repeats))
    long_time = min(timed_training(family, argv_for_steps(long, f"l{i}")) for i in range(repeats))
    return (long_time - short_time) / (long - short)
