"""merge_lora streams: on a synthetic ~1 GB SDXL-named checkpoint its peak RssAnon (anonymous memory,
not the file pages ru_maxrss would count) stays under 400 MB, measured in a fresh process."""

import os
import shutil
import sys
import tempfile

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from merge_lora_memory import (  # noqa: E402
    kohya_linears, merge_in_child, uniform_checkpoint_shapes, write_lora, write_synthetic_checkpoint,
)


@pytest.fixture
def scratch_dir(tmp_path):
    """A RAM-backed folder when there is room (the test measures memory, not this VM's disk), else tmp_path."""
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 4e9:
        folder = tempfile.mkdtemp(prefix="merge_memory_", dir="/dev/shm")
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield str(tmp_path)


def test_merge_of_a_1gb_checkpoint_stays_under_400mb_anonymous_memory(scratch_dir):
    model, lora, merged = (os.path.join(scratch_dir, name) for name in ("model.safetensors", "lora.safetensors",
                                                                          "out.safetensors"))
    shapes = uniform_checkpoint_shapes(1.0)
    size = write_synthetic_checkpoint(model, shapes)
    write_lora(lora, kohya_linears(shapes), rank=16)
    _, figures = merge_in_child(model, lora, merged)
    assert size > 0.99e9 and os.path.getsize(merged) - size < 1000  # the same tensors; metadata grew
    assert figures["peak_mib"] < 400, figures
    name = next(iter(shapes))
    with safe_open(model, "pt") as before, safe_open(merged, "pt") as after:
        assert not torch.equal(before.get_tensor(name), after.get_tensor(name))  # the LoRA was merged
