"""benchmarks/gpu_check.py in its CPU mode: the real command, a few blocks, one step per configuration,
each section in its own process as on CUDA."""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_mode_writes_every_section(tmp_path):
    path = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "gpu_check.py"), "--json", str(path), "--double", "4",
         "--single", "8", "--swaps", "0", "4", "--full_swaps", "0", "4", "--steps", "1", "--warmup", "0", "--rank", "4", "--isolate"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No CUDA: tiny widths on the CPU. Needs CUDA:" in result.stdout
    report = json.loads(path.read_text())
    meta, sections = report["meta"], report["sections"]
    assert meta["cuda"] is False and meta["tiny"] is True and meta["needs_cuda"]
    assert {name: s["status"] for name, s in sections.items()} == {"flux": "ok", "flux_baseline": "ok", "flux_full": "ok",
                                                                    "sdxl": "ok"}

    flux = sections["flux"]
    assert flux["model"]["double"] == 4 and flux["model"]["single"] == 8 and flux["model"]["lora_rank"] == 4
    assert [(c["precision"], c["blocks_to_swap"]) for c in flux["configs"]] == [
        ("bf16", 0), ("bf16", 4), ("fp8", 0), ("fp8", 4)]
    for config in flux["configs"]:
        assert config["step_ms"] > 0 and config["peak_allocated_gib"] is None  # no VRAM figure without CUDA
    swapped = [c for c in flux["configs"] if c["blocks_to_swap"]]
    for config in swapped:
        # blocks_to_swap 4 = 2 double + 4 single blocks; swapping on the CPU computes the very same numbers
        assert config["swapped_bytes"] > 0 and config["unscheduled_loads"] == 0
        exact = config["exactness_vs_no_swap"]
        assert exact["grads_finite"] and exact["exact_to_bf16"]
        assert exact["loss_rel_diff"] == 0.0 and exact["grad_rel_diff"] == 0.0
    bf16_loss, fp8_loss = flux["configs"][0]["first_loss"], flux["configs"][2]["first_loss"]
    assert bf16_loss > 0 and fp8_loss > 0 and bf16_loss != fp8_loss  # fp8 storage rounds the weights

    assert sections["flux_baseline"]["step_ms"] > 0
    full = sections["flux_full"]  # flux_train.py's step: fused Adafactor, bf16 weights, trained blocks swapped
    assert full["model"]["optimizer"] == "Adafactor, --fused_backward_pass"
    assert [c["blocks_to_swap"] for c in full["configs"]] == [0, 4]
    for config in full["configs"]:
        assert "error" not in config, config.get("traceback")
        assert config["step_ms"] > 0 and config["first_loss"] > 0 and config["peak_allocated_gib"] is None
    assert full["configs"][0]["swapped_bytes"] == 0
    assert full["configs"][1]["swapped_bytes"] > 0 and full["configs"][1]["unscheduled_loads"] == 0
    sdxl = sections["sdxl"]["configs"]
    assert [c["gradient_checkpointing"] for c in sdxl] == [False, True]
    assert all(c["step_ms"] > 0 for c in sdxl)
