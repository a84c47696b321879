"""Safe stop: Ctrl+C (SIGINT) finishes the step, saves the LoRA and a state, exits 0, and --resume gives
the uninterrupted run's LoRA; a second Ctrl+C exits at once (code 130) leaving no half-written file."""

import json
import os
import signal

from safetensors.torch import load_file

from library.cli import INTERRUPTED_EXIT_CODE, run_training
from library.training.state import PAUSE_FOR_TESTS_ENV
from test_resume_kill import Training, argv, one_thread  # noqa: F401  (one_thread: autouse fixture)

COMMON = ["--max_train_steps", "8", "--gradient_accumulation_steps", "2", "--loss_log_every", "1",
          "--shuffle_caption", "--network_dropout", "0.1", "--lr_scheduler", "cosine"]


def assert_same_lora(expected_path, actual_path):
    expected, actual = load_file(expected_path), load_file(actual_path)
    assert expected.keys() == actual.keys()
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) < 1e-6


def leftovers(folder):
    """Temp files of atomic writes and half-written state folders."""
    return [name for root, dirs, files in os.walk(folder) for name in dirs + files
            if name.endswith((".tmp", ".partial", ".previous"))]


def test_ctrl_c_saves_and_resume_is_exact_second_ctrl_c_stops_at_once(tiny_sd15_folder, demo_image_root, tmp_path):
    run_training("sd", "network", argv(tiny_sd15_folder, demo_image_root, tmp_path / "whole", *COMMON))

    # one Ctrl+C: the step finishes, LoRA + state are saved under the step's name, exit code 0
    stopped = tmp_path / "stopped"
    training = Training(argv(tiny_sd15_folder, demo_image_root, stopped, *COMMON))
    training.wait_for("step 3/8:")
    os.kill(training.process.pid, signal.SIGINT)
    assert training.exit_code() == 0, "".join(training.lines[-20:])
    files = sorted(os.listdir(stopped))
    assert len(files) == 2 and files[0].endswith("-state") and files[1] == files[0][:-len("-state")] + ".safetensors"
    step = json.loads((stopped / files[0] / "train_state.json").read_text())["global_step"]
    assert files[1] == f"out-step{step:08d}.safetensors" and step in (3, 4)
    assert any(f"stopped by SIGINT at step {step}/8" in line for line in training.lines)
    run_training("sd", "network", argv(tiny_sd15_folder, demo_image_root, stopped, *COMMON, "--resume", "latest"))
    assert_same_lora(tmp_path / "whole" / "out.safetensors", stopped / "out.safetensors")

    # two Ctrl+C, the second while the stop's state save is in progress: exit 130 at once, no
    # half-written state; the complete step-2 state resumes exactly
    twice = tmp_path / "twice"
    training = Training(argv(tiny_sd15_folder, demo_image_root, twice, *COMMON, "--save_every_n_steps", "2",
                             "--save_state"), {PAUSE_FOR_TESTS_ENV: "2"})
    training.wait_for("step 3/8:")
    os.kill(training.process.pid, signal.SIGINT)
    training.wait_for("pausing inside the state save", count=2)
    os.kill(training.process.pid, signal.SIGINT)
    assert training.exit_code() == INTERRUPTED_EXIT_CODE
    assert any("stopped at once: files being written were discarded" in line for line in training.lines)
    assert leftovers(twice) == []
    assert [name for name in os.listdir(twice) if name.endswith("-state")] == ["out-step00000002-state"]
    run_training("sd", "network", argv(tiny_sd15_folder, demo_image_root, twice, *COMMON, "--save_every_n_steps", "2",
                                       "--save_state", "--resume", "latest"))
    assert_same_lora(tmp_path / "whole" / "out.safetensors", twice / "out.safetensors")
