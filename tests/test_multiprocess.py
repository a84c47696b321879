"""Two processes (accelerate launch, DDP over gloo on the CPU) train like one process with twice the batch."""

import logging
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from library.cli import run_training
from library.training.distributed import rank_shares


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, like the subprocesses: the tiny models gain nothing from more, a busy 2-core
    machine runs them many times slower with 2, and resume exactness compares runs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_shares_are_equal_in_count_and_weighted_to_the_global_mean():
    global_batches = [["a", "b", "c"], ["d"]]
    first, second = rank_shares(global_batches, 0, 2), rank_shares(global_batches, 1, 2)
    assert [s.refs for s in first] == [["a", "b"], ["d"]] and [s.refs for s in second] == [["c"], ["d"]]
    assert [s.loss_scale(2) for s in first] == [2 / 3, 2.0] and [s.loss_scale(2) for s in second] == [2 / 3, 0.0]
    assert second[1].is_padding  # rank 1 runs "d" again so both processes step together, weighted 0
    assert [s.refs for s in rank_shares(global_batches, 0, 1)] == global_batches


def step_losses(text: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in re.findall(r"step (\d+)/4: mean loss ([0-9.]+)", text)}


def test_two_processes_match_one_process_with_twice_the_batch(tiny_sd15_folder, demo_image_root, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shape --d 1 --w 64 --h 64 --s 1\n")

    def args(output, batch_size):
        return ["--pretrained_model_name_or_path", tiny_sd15_folder, "--train_data_dir", demo_image_root,
                # 128 pixels: at 64 the tiny UNet's deepest GroupNorms see a handful of values and amplify
                # float rounding (batch of 2 vs two batches of 1) a million-fold
                "--resolution", "128", "--output_dir", str(output), "--output_name", "out", "--seed", "9",
                "--train_batch_size", str(batch_size), "--network_module", "networks.lora", "--network_dim", "4",
                "--optimizer_type", "SGDNesterov", "--learning_rate", "0.1", "--max_train_steps", "4",
                "--lr_scheduler", "linear", "--shuffle_caption", "--flip_aug", "--caption_dropout_rate", "0.3",
                "--loss_log_every",
                "1", "--save_state_on_train_end", "--sample_prompts", str(prompts), "--sample_every_n_steps", "4"]

    caplog.set_level(logging.INFO, logger="library.training.trainer")
    run_training("sd", "network", args(tmp_path / "one", 2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}  # --multi_gpu with this variable: DDP over gloo on the CPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    done = subprocess.run([*launch, os.path.join(REPO_ROOT, "sd_train_network.py"), *args(tmp_path / "two", 1)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 steps: 2 epochs of 3 batches (gradient accumulation 1, 2 processes)" in done.stderr

    # step 1 runs the same samples, captions, noise and timesteps before any update: the same loss
    one_losses, two_losses = step_losses(caplog.text), step_losses(done.stderr)
    assert sorted(two_losses) == [1, 2, 3, 4] and abs(one_losses[1] - two_losses[1]) < 2e-5
    one, two = load_file(tmp_path / "one" / "out.safetensors"), load_file(tmp_path / "two" / "out.safetensors")
    assert one.keys() == two.keys()
    # LoRA up weights start at zero, so they are the trained change; the runs differ by float rounding only
    ups = [k for k in one if k.endswith("lora_up.weight")]
    change = sum(one[k].norm() ** 2 for k in ups) ** 0.5
    difference = sum((one[k] - two[k]).norm() ** 2 for k in one) ** 0.5
    assert change > 1e-3 and difference / change < 1e-4, (difference, change)
    # only the main process wrote: one sample and one contact sheet, the same files as the 1-process run
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    samples = sorted(os.listdir(tmp_path / "two" / "sample"))
    assert len(samples) == 2 and re.fullmatch(r"out_000004_00_\d{14}_1\.png", samples[0])
    # every process wrote its RNG state into the state folder
    state = set(os.listdir(tmp_path / "two" / "out-state"))
    assert {"random_states_0.pkl", "random_states_1.pkl", "train_state.json"} <= state
