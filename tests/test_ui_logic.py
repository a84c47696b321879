"""The web UI's own logic, without a browser: caption files, the dataset TOML and --config_file TOML it
writes (read back by the trainer's own loaders), run folders (TensorBoard scalars, progress, status,
samples, log tail), child processes and their safe stop, and ui.py's options."""

import argparse
import os
import sys
import time

import pytest

from library.config.arguments import parse_training_args
from library.config.dataset_config import load_dataset_group
from library.errors import UserError
from library.families import get_family
from library.ui import run_folder
from library.ui.context import UIContext
from library.ui.dataset_files import (DatasetSettings, guess_caption_extension, list_images, write_caption,
                                      write_dataset_toml)
from library.ui.run_config import FAMILIES, NETWORK_TYPES, PRESETS, RunSettings, training_command, write_run_config
from library.ui.run_process import RunProcesses
from library.ui.train_page import create_run


@pytest.fixture
def demo_subset(demo_image_root):
    return os.path.join(demo_image_root, "1_shape")


def test_images_captions_and_caption_edits(demo_subset):
    entries = list_images(demo_subset, ".caption")
    assert [os.path.basename(e.image) for e in entries][:2] == ["00_red_circle.png", "01_blue_square.png"]
    assert entries[0].caption == "a red circle, flat drawing"
    assert guess_caption_extension(demo_subset) == ".caption"
    assert all(e.caption is None for e in list_images(demo_subset, ".txt"))

    path = write_caption(entries[0].image, ".caption", "  a red\ncircle,  edited ")
    assert open(path).read() == "a red circle, edited\n"  # one line: the trainer reads the first line only
    assert list_images(demo_subset, ".caption")[0].caption == "a red circle, edited"
    assert [name for name in os.listdir(demo_subset) if name.endswith(".tmp")] == []
    with pytest.raises(UserError, match="does not exist"):
        list_images(demo_subset + "_missing", ".caption")


def test_dataset_toml_is_what_the_trainer_loads(demo_subset, tmp_path):
    settings = DatasetSettings(demo_subset, ".caption", num_repeats=3, trigger_word="ohwx", resolution=128,
                               batch_size=2, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256)
    path = str(tmp_path / "ds.toml")
    text = write_dataset_toml(settings, path)
    assert open(path).read() == text
    group = load_dataset_group(argparse.Namespace(dataset_config=path))
    dataset = group.datasets[0]
    subset = dataset.subsets[0]
    assert (dataset.resolution, dataset.batch_size, dataset.enable_bucket, dataset.min_bucket_reso,
            dataset.max_bucket_reso) == ((128, 128), 2, True, 64, 256)
    assert (subset.image_dir, subset.num_repeats, subset.captions.trigger_word, subset.caption_extension) == \
        (demo_subset, 3, "ohwx", ".caption")

    settings.min_bucket_reso = 256  # buckets the trainer would refuse: reported when writing
    with pytest.raises(UserError, match=r"ds.toml: min_bucket_reso \(256\) is larger than the shorter side"):
        write_dataset_toml(settings, path)


def run_settings(model, dataset_config, output_dir, **changes):
    values = dict(family="sd", model=model, dataset_config=dataset_config, output_dir=str(output_dir),
                  output_name="ui_lora", preset="CPU (float32)", network_dim=8, network_alpha=4,
                  max_train_steps=7, learning_rate=2e-3, seed=3, sample_prompts="a red circle\na cat --w 96 --s 3\n",
                  sample_every_n_steps=5, sample_size=64, sample_steps=4, save_every_n_steps=2)
    return RunSettings(**{**values, **changes})


def test_config_toml_is_what_the_script_parses(tiny_sd15_folder, demo_subset, tmp_path):
    dataset_config = str(tmp_path / "ds.toml")
    write_dataset_toml(DatasetSettings(demo_subset, resolution=64, enable_bucket=False), dataset_config)
    config = str(tmp_path / "config.toml")
    write_run_config(run_settings(tiny_sd15_folder, dataset_config, tmp_path, network_type=NETWORK_TYPES[1]), config)
    _, args = parse_training_args(get_family("sd"), "network", ["--config_file", config])
    assert (args.pretrained_model_name_or_path, args.dataset_config, args.output_dir, args.output_name) == \
        (tiny_sd15_folder, dataset_config, str(tmp_path), "ui_lora")
    assert (args.network_module, args.network_dim, args.network_alpha, args.network_args) == \
        ("networks.lora", 8, 4.0, ["conv_dim=8", "conv_alpha=4"])
    assert (args.max_train_steps, args.learning_rate, args.seed, args.mixed_precision, args.cache_latents) == \
        (7, 2e-3, 3, "no", True)
    assert (args.save_every_n_steps, args.sample_every_n_steps, args.logging_dir) == \
        (2, 5, os.path.join(str(tmp_path), "logs"))
    assert open(args.sample_prompts).read().splitlines() == ["a red circle --w 64 --h 64 --s 4",
                                                             "a cat --w 96 --s 3 --h 64"]
    assert training_command("sd", config, resume=True)[1:] == [
        FAMILIES["sd"].script("sd"), "--config_file", config, "--resume", "latest"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_preset_of_every_family_is_accepted_by_its_script(family, tmp_path, monkeypatch):
    """Presets hold only flags the family's script accepts (model files are checked when training starts)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # block-swap presets are refused without CUDA
    for preset in PRESETS[family]:
        settings = run_settings("model.safetensors", "ds.toml", tmp_path, family=family, preset=preset,
                                model_files={flag: f"{flag}.safetensors" for flag in FAMILIES[family].model_files})
        config = str(tmp_path / "config.toml")
        write_run_config(settings, config)
        _, args = parse_training_args(get_family(family), "network", ["--config_file", config])
        for flag, value in PRESETS[family][preset].items():
            assert getattr(args, flag) == value, (family, preset, flag)


def write_scalars(log_dir, points, start_time):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
    for step, loss in points:
        writer.add_scalar("loss", loss, step, walltime=start_time + 2.0 * step)
        writer.add_scalar("lr", 1e-3 / step, step, walltime=start_time + 2.0 * step)
    writer.close()


def test_run_folder_progress_status_samples_and_log(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / "sample").mkdir(parents=True)
    (run / "config.toml").write_text('[output_arguments]\noutput_name = "r1"\n[training_arguments]\n'
                                     'max_train_steps = 10\n')
    assert run_folder.read_progress(str(run)).describe() == "starting (loading the model, caching latents)"
    write_scalars(str(run / "logs" / "train"), [(1, 0.9), (2, 0.8), (3, 0.7)], 1000.0)
    time.sleep(0.01)
    write_scalars(str(run / "logs" / "train"), [(3, 0.65), (4, 0.6)], 1000.0)  # a resumed run's file wins
    curves = run_folder.read_scalars(str(run / "logs"))
    assert curves["loss"].steps == [1, 2, 3, 4] and curves["loss"].values == pytest.approx([0.9, 0.8, 0.65, 0.6])
    progress = run_folder.read_progress(str(run))
    assert (progress.step, progress.max_steps, progress.seconds_per_step, progress.eta_seconds) == (4, 10, 2.0, 12.0)
    assert progress.describe() == "step 4/10, loss 0.6000, lr 2.50e-04, ETA 0:12"
    assert progress.describe(running=False) == "step 4/10, loss 0.6000, lr 2.50e-04"

    assert run_folder.run_status(str(run), running=True) == "running"
    assert run_folder.run_status(str(run), running=False) == "not finished"
    (run / "r1-step00000004.safetensors").write_bytes(b"x")
    (run / "r1-step00000004-state").mkdir()
    assert run_folder.run_status(str(run), running=False) == "stopped at step 4 (Resume continues it)"
    (run / "r1.safetensors").write_bytes(b"x")
    assert run_folder.run_status(str(run), running=False) == "finished"
    assert run_folder.saved_files(str(run)) == ["r1-step00000004.safetensors", "r1.safetensors"]

    for name in ("r1_000004_00.png", "r1_000004_contact_sheet.png", "r1_000008_00.png"):
        (run / "sample" / name).write_bytes(b"png")
        time.sleep(0.01)
    assert [os.path.basename(p) for p in run_folder.sample_images(str(run))] == ["r1_000008_00.png",
                                                                                 "r1_000004_00.png"]
    (run / "train.log").write_text("loading\nsteps: 1/10\rsteps: 2/10\rsteps: 3/10\ndone\n")
    assert run_folder.log_tail(str(run)) == "loading\nsteps: 3/10\ndone"

    (tmp_path / "runs" / "not_a_run").mkdir()
    (tmp_path / "runs" / "r2").mkdir()
    time.sleep(0.01)
    (tmp_path / "runs" / "r2" / "config.toml").write_text("")
    assert run_folder.list_runs(str(tmp_path / "runs")) == [str(tmp_path / "runs" / "r2"), str(run)]


CHILD = """
import signal, sys, time
def stop(number, frame):
    open("stopped.txt", "w").write(signal.Signals(number).name)
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
print("started", flush=True)
time.sleep(60)
"""


def test_child_process_log_and_stop_with_sigint(tmp_path):
    processes = RunProcesses()
    run = str(tmp_path)
    processes.start(run, [sys.executable, "-c", CHILD])
    with pytest.raises(UserError, match="already training"):
        processes.start(run, [sys.executable, "-c", CHILD])
    deadline = time.time() + 30
    while "started" not in run_folder.log_tail(run).splitlines() and time.time() < deadline:  # the line, not the command
        time.sleep(0.1)
    assert processes.is_running(run) and processes.exit_code(run) is None
    assert processes.stop(run)
    assert processes.wait(run, timeout=30) == 0 and not processes.is_running(run)
    assert (tmp_path / "stopped.txt").read_text() == "SIGINT"
    assert run_folder.log_tail(run).splitlines()[0].startswith(f"$ {sys.executable} -c")
    assert not processes.stop(run)


def test_create_run_refuses_bad_names_missing_configs_and_existing_runs(tmp_path):
    context = UIContext(str(tmp_path / "workspace"))
    settings = run_settings("model", str(tmp_path / "missing.toml"), "", output_name="../escape")
    with pytest.raises(UserError, match="use letters, digits"):
        create_run(context, settings)
    settings.output_name = "r1"
    with pytest.raises(UserError, match="write it on the Dataset page"):
        create_run(context, settings)
    (tmp_path / "missing.toml").write_text("")
    os.makedirs(os.path.join(context.runs_dir, "r1"))
    open(os.path.join(context.runs_dir, "r1", "r1.safetensors"), "wb").close()
    with pytest.raises(UserError, match="run r1 already exists"):
        create_run(context, settings)


def test_ui_options_and_app_build(tmp_path):
    from library.ui.app import build_app, exposure_warning, parse_args

    args = parse_args(["--host", "0.0.0.0", "--port", "7000", "--auth", "me:secret:colon"])
    assert (args.host, args.port, args.auth) == ("0.0.0.0", 7000, "me:secret:colon")
    assert exposure_warning(args) == ("listening on 0.0.0.0: anyone who can reach port 7000 can start training "
                                      "runs and read files as this user")
    assert "add --auth user:password" in exposure_warning(parse_args(["--host", "192.168.1.2"]))
    assert parse_args([]).host == "127.0.0.1" and exposure_warning(parse_args([])) is None
    with pytest.raises(UserError, match="user:password"):
        parse_args(["--auth", "nopassword"])
    app = build_app(UIContext(str(tmp_path / "workspace")))
    labels = {block.label for block in app.blocks.values() if getattr(block, "label", None)}
    assert {"Dataset", "Train", "Run", "Runs", "Image folder", "Caption", "Model family", "Runs (newest first)"} <= labels


def test_resume_starts_the_runs_script_with_resume_latest(tmp_path):
    """Resume runs the real script of the run's family; here its dataset config is gone, so it stops with
    the script's own error, which the Run page shows with the exit code."""
    from library.ui.run_page import resume, run_views

    context = UIContext(str(tmp_path / "workspace"))
    run = os.path.join(context.runs_dir, "r1")
    os.makedirs(run)
    with open(os.path.join(run, "config.toml"), "w") as f:
        f.write(f'pretrained_model_name_or_path = "model"\ndataset_config = "{tmp_path / "gone.toml"}"\n'
                f'output_dir = "{run}"\nmax_train_steps = 3\n')
    with pytest.raises(UserError, match="family.txt is missing"):
        resume(context, run)
    run_folder.write_family(run, "sd")
    assert resume(context, run) == f"resumed {run}"
    assert context.processes.wait(run, timeout=120) == 2
    log = open(os.path.join(run, "train.log")).read().splitlines()
    assert log[0] == f"$ {sys.executable} {FAMILIES['sd'].script('sd')} --config_file " \
                     f"{os.path.join(run, 'config.toml')} --resume latest"
    assert log[-1] == f"error: {tmp_path / 'gone.toml'}: file not found"
    status = run_views(context, run)[0]
    assert status == "**r1**: not finished (the script exited with code 2: see the log)"
    with pytest.raises(UserError, match="no run to resume"):
        resume(context, None)


def test_caption_command_is_what_the_caption_tool_accepts(demo_subset, monkeypatch):
    import importlib.util

    from library.ui.dataset_page import CAPTION_TOOL, caption_command, run_caption_tool

    command = caption_command(demo_subset, ".txt", " local/blip ", overwrite=True)
    if not os.path.isfile(CAPTION_TOOL):  # the tool arrives on another branch; the UI says so meanwhile
        assert run_caption_tool(demo_subset, ".txt", "m", False).startswith("captioning needs tools/caption_images.py")
        return
    spec = importlib.util.spec_from_file_location("caption_images", CAPTION_TOOL)
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "caption_images", tool)  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    args = tool.build_parser().parse_args(command[2:])
    assert (args.image_dir, args.model, args.caption_extension, args.overwrite, args.recursive) == \
        (demo_subset, "local/blip", ".txt", True, False)
