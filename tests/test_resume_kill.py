"""Exact resume after SIGKILL (at a random step, and in the middle of a state save), finding the
newest complete state, state pruning, and stopping on non-finite losses without damaging saves."""

import json
import os
import random
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT
from library.cli import run_training
from library.training.state import PAUSE_FOR_TESTS_ENV, find_latest_state


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, like the subprocesses: the tiny models gain nothing from more, a busy 2-core
    machine runs them many times slower with 2, and resume exactness compares runs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def argv(model, images, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", images, "--resolution", "64",
            "--output_dir", str(output_dir), "--output_name", "out", "--seed", "5", "--train_batch_size", "1",
            "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-3", *extra]


class Training:
    """sd_train_network.py in a subprocess whose stderr lines the test can wait for."""

    def __init__(self, args, extra_env=None):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1",
               **(extra_env or {})}
        self.process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "sd_train_network.py"), *args],
                                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                                        cwd=REPO_ROOT)
        self.lines: list[str] = []
        self.seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            with self.seen:
                self.lines.append(line)
                self.seen.notify_all()
        with self.seen:
            self.lines.append("<exit>")
            self.seen.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout: float = 240) -> None:
        """Wait until `count` stderr lines contain `text` (the process must still be running)."""
        with self.seen:
            found = self.seen.wait_for(lambda: sum(text in line for line in self.lines) >= count
                                       or self.lines[-1:] == ["<exit>"], timeout)
        output = "".join(self.lines[-20:])
        assert found and not self.lines[-1] == "<exit>", f"never saw {text!r}:\n{output}"

    def exit_code(self, timeout: float = 120) -> int:
        """Wait for the process to end and for all its stderr lines to be read."""
        code = self.process.wait(timeout=timeout)
        with self.seen:
            self.seen.wait_for(lambda: self.lines[-1:] == ["<exit>"], timeout)
        return code

    def kill_when(self, text: str, timeout: float = 240) -> None:
        self.wait_for(text, timeout=timeout)
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=60) == -signal.SIGKILL


def test_sigkill_anywhere_then_resume_latest_gives_the_uninterrupted_lora(tiny_sd15_folder, demo_image_root,
                                                                          tmp_path, caplog):
    common = ["--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--save_every_n_steps", "2",
              "--save_state", "--loss_log_every", "1", "--shuffle_caption", "--flip_aug", "--caption_dropout_rate",
              "0.3", "--network_dropout", "0.1", "--lr_scheduler", "cosine"]
    # the uninterrupted run also keeps fewer state folders (--save_last_n_steps_state) than LoRA files
    run_training("sd", "network", argv(tiny_sd15_folder, demo_image_root, tmp_path / "whole", *common,
                                       "--save_last_n_steps", "2", "--save_last_n_steps_state", "1"))
    assert sorted(os.listdir(tmp_path / "whole")) == [
        "out-state", "out-step00000002.safetensors", "out-step00000004-state", "out-step00000004.safetensors",
        "out.safetensors"]

    killed = tmp_path / "killed"
    # a random moment after the first state save (step 2): right after it, or after step 3 or 4 (maybe mid-save)
    kill_at = random.choice(["saved training state to", "step 3/6:", "step 4/6:"])
    Training(argv(tiny_sd15_folder, demo_image_root, killed, *common)).kill_when(kill_at)
    assert find_latest_state(str(killed), "out") is not None
    # resume, and kill again while the next state save is half-written
    resumed = Training(argv(tiny_sd15_folder, demo_image_root, killed, *common, "--resume", "latest"),
                       {PAUSE_FOR_TESTS_ENV: "300"})
    resumed.kill_when("pausing inside the state save")
    assert any("resumed from" in line for line in resumed.lines)
    half_written = [name for name in os.listdir(killed) if name.endswith("-state.partial")]
    assert len(half_written) == 1 and not os.path.exists(killed / half_written[0] / "train_state.json")

    run_training("sd", "network", argv(tiny_sd15_folder, demo_image_root, killed, *common, "--resume", "latest"))
    assert f"ignoring {killed / half_written[0]}: it has no train_state.json" in caplog.text
    whole, final = load_file(tmp_path / "whole" / "out.safetensors"), load_file(killed / "out.safetensors")
    assert whole.keys() == final.keys()
    assert max((whole[k] - final[k]).abs().max().item() for k in whole) < 1e-6, f"first kill at {kill_at!r}"
    assert json.loads((killed / "out-state" / "train_state.json").read_text())["global_step"] == 6


def write_state(folder, step):
    folder.mkdir()
    if step is not None:
        (folder / "train_state.json").write_text(json.dumps({"global_step": step, "epoch": 1, "batch_index": 0,
                                                             "seed": 1, "format_version": 1}))


def test_latest_state_skips_half_written_folders_and_other_names(tmp_path, caplog):
    write_state(tmp_path / "out-step00000002-state", 2)
    write_state(tmp_path / "out-step00000004-state.partial", None)  # killed while writing
    write_state(tmp_path / "outdoor-step00000009-state", 9)  # another run's name
    assert find_latest_state(str(tmp_path), "out") == str(tmp_path / "out-step00000002-state")
    assert "ignoring" in caplog.text and "out-step00000004-state.partial" in caplog.text
    write_state(tmp_path / "out-state.previous", 6)  # killed between the two renames of a save
    assert find_latest_state(str(tmp_path), "out") == str(tmp_path / "out-state.previous")
    assert find_latest_state(str(tmp_path / "missing"), "out") is None


def test_nonfinite_losses_stop_the_run_and_keep_the_last_good_saves(tiny_sd15_folder, demo_image_root, tmp_path,
                                                                    capsys):
    # a learning rate of 1e30 makes every loss after the first step infinite
    with pytest.raises(SystemExit) as stopped:
        run_training("sd", "network", argv(tiny_sd15_folder, demo_image_root, tmp_path / "diverged",
                                           "--learning_rate", "1e30", "--max_train_steps", "6", "--train_batch_size",
                                           "2", "--save_every_n_steps", "1", "--save_state",
                                           "--max_nonfinite_steps", "2"))
    assert stopped.value.code == 2
    assert ("error: training stopped at step 3: the loss was NaN or inf at steps 2-3 (--max_nonfinite_steps 2); "
            "the last saves (out-step00000001.safetensors, out-step00000001-state) are kept unchanged") \
        in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "diverged")) == ["out-step00000001-state", "out-step00000001.safetensors"]
    good = load_file(tmp_path / "diverged" / "out-step00000001.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())

    # NaN weights from --network_weights: nothing good to keep, nothing written
    poisoned = {k: torch.full_like(t, float("nan")) if k.endswith("lora_up.weight") else t for k, t in good.items()}
    save_file(poisoned, str(tmp_path / "nan.safetensors"))
    with pytest.raises(SystemExit):
        run_training("sd", "network", argv(tiny_sd15_folder, demo_image_root, tmp_path / "nan", "--max_train_steps",
                                           "4", "--network_weights", str(tmp_path / "nan.safetensors")))
    assert "the loss was NaN or inf at steps 1-3 (--max_nonfinite_steps 3); nothing was saved yet" in capsys.readouterr().err
    assert os.listdir(tmp_path / "nan") == []
