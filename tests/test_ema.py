"""EMA of the trained weights (library/training/ema.py): the average against the formula written out
here, the files a run writes (LoRA and full fine-tune), exact resume, and samples drawn with EMA weights."""

import argparse
import shutil

import pytest
import torch
from safetensors.torch import load_file

from library.cli import run_training
from library.errors import UserError
from library.training.ema import EMATracker, add_ema_arguments, ema_path, validate_ema_args


@pytest.fixture(autouse=True)
def one_thread():
    """Resume exactness compares runs bit for bit; one torch thread keeps the tiny runs deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ema_args(*argv):
    parser = argparse.ArgumentParser()
    add_ema_arguments(parser)
    parser.add_argument("--sample_prompts", default=None)
    args = parser.parse_args(list(argv))
    validate_ema_args(args)
    return args


def reference_decay(n: int, decay: float, after: int, warmup: str, power=2 / 3, inv_gamma=1.0) -> float:
    """The decay of the n-th EMA update (1-based), written from diffusers' documented schedule."""
    k = n - after - 1
    if k <= 0:
        return 0.0
    if warmup == "none":
        return decay
    if warmup == "ratio":
        return min(decay, (1 + k) / (10 + k))
    return min(decay, 1 - (1 + k / inv_gamma) ** -power)


@pytest.mark.parametrize("warmup, extra", [("none", []), ("ratio", []), ("power", ["--ema_power", "0.75"])])
def test_average_equals_hand_computed_formula(warmup, extra):
    layer = torch.nn.Linear(3, 2)
    args = ema_args("--ema", "--ema_decay", "0.9", "--ema_warmup", warmup, "--ema_update_after_step", "1",
                    "--ema_update_every", "2", *extra)
    tracker = EMATracker(args, layer.parameters())
    generator = torch.Generator().manual_seed(0)
    expected = [p.detach().clone() for p in layer.parameters()]
    updates = 0
    for step in range(1, 13):
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        tracker.update(step)
        if step % 2 == 0:  # --ema_update_every 2
            updates += 1
            d = reference_decay(updates, 0.9, 1, warmup, power=0.75 if warmup == "power" else 2 / 3)
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, layer.parameters())]
    raw = [p.detach().clone() for p in layer.parameters()]
    with tracker.applied():
        for p, e in zip(layer.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
    for p, r in zip(layer.parameters(), raw):  # the raw weights are back after the block
        assert torch.equal(p.detach(), r)


def test_flag_validation():
    with pytest.raises(UserError, match="--ema_decay needs --ema"):
        ema_args("--ema_decay", "0.9")
    with pytest.raises(UserError, match="between 0 and 1"):
        ema_args("--ema", "--ema_decay", "1.5")
    with pytest.raises(UserError, match="--ema_warmup power"):
        ema_args("--ema", "--ema_power", "0.5")
    with pytest.raises(UserError, match="needs --sample_prompts"):
        ema_args("--ema", "--sample_with_ema")
    assert ema_path("/x/out-step00000002.safetensors") == "/x/out-step00000002-ema.safetensors"
    assert ema_path("/x/out") == "/x/out-ema"


def lora_run(model, images, output_dir, *extra):
    run_training("sd", "network", [
        "--pretrained_model_name_or_path", model, "--train_data_dir", images, "--resolution", "64",
        "--output_dir", str(output_dir), "--output_name", "out", "--seed", "3", "--train_batch_size", "2",
        "--network_module", "networks.lora", "--network_dim", "2", "--learning_rate", "1e-2",
        "--network_train_unet_only", "--max_train_steps", "4",
        "--ema", "--ema_decay", "0.5", "--ema_warmup", "none", *extra,
    ])


def test_lora_ema_file_equals_average_of_step_saves(tiny_sd15_folder, demo_image_root, tmp_path):
    lora_run(tiny_sd15_folder, demo_image_root, tmp_path, "--save_every_n_steps", "1")
    steps = [load_file(tmp_path / f"out-step{n:08d}.safetensors") for n in (1, 2, 3)]
    steps.append(load_file(tmp_path / "out.safetensors"))
    ema = load_file(tmp_path / "out-ema.safetensors")
    assert set(ema) == set(steps[-1])
    for key in ema:
        expected = steps[0][key]  # the first update copies the weights; then fixed decay 0.5
        for weights in steps[1:]:
            expected = 0.5 * expected + 0.5 * weights[key]
        torch.testing.assert_close(ema[key], expected, rtol=0, atol=1e-7)
    up = next(k for k in ema if "lora_up" in k)
    assert not torch.equal(ema[up], steps[-1][up])
    assert (tmp_path / "out-step00000002-ema.safetensors").exists()


def test_lora_ema_resume_is_exact_and_samples_use_ema(tiny_sd15_folder, demo_image_root, tmp_path, monkeypatch):
    from library.training import sampling

    seen = []

    def record(sampler, step, epoch=None):
        seen.append({k: v.detach().clone() for k, v in sampler.trainable_modules[0].state_dict().items()})
        return []

    monkeypatch.setattr(sampling.Sampler, "sample", record)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shape\n")
    sample_flags = ["--sample_prompts", str(prompts), "--sample_every_n_steps", "4", "--sample_with_ema"]
    whole = tmp_path / "whole"
    lora_run(tiny_sd15_folder, demo_image_root, whole, "--save_every_n_steps", "2", "--save_state", *sample_flags)
    ema = load_file(whole / "out-ema.safetensors")
    assert seen and all(torch.equal(seen[-1][k], ema[k]) for k in ema)  # sampled with the EMA weights
    assert not all(torch.equal(seen[-1][k], v) for k, v in load_file(whole / "out.safetensors").items())

    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "out-step00000002-state", resumed / "out-step00000002-state")
    lora_run(tiny_sd15_folder, demo_image_root, resumed, "--resume", "latest")
    again = load_file(resumed / "out-ema.safetensors")
    assert all(torch.equal(again[k], ema[k]) for k in ema)


def test_resume_without_ema_state_is_refused(tiny_sd15_folder, demo_image_root, tmp_path, capsys):
    run_training("sd", "network", [
        "--pretrained_model_name_or_path", tiny_sd15_folder, "--train_data_dir", demo_image_root,
        "--resolution", "64", "--output_dir", str(tmp_path), "--output_name", "out", "--seed", "3",
        "--network_module", "networks.lora", "--network_dim", "2", "--network_train_unet_only",
        "--max_train_steps", "1", "--save_state"])
    with pytest.raises(SystemExit) as exit_info:
        lora_run(tiny_sd15_folder, demo_image_root, tmp_path, "--resume", "latest")
    assert exit_info.value.code == 2 and "saved without --ema" in capsys.readouterr().err


def test_full_fine_tune_writes_ema_model(tiny_sd15_folder, demo_image_root, tmp_path):
    run_training("sd", "full", [
        "--pretrained_model_name_or_path", tiny_sd15_folder, "--train_data_dir", demo_image_root,
        "--resolution", "64", "--output_dir", str(tmp_path), "--output_name", "out", "--seed", "3",
        "--train_batch_size", "2", "--learning_rate", "1e-3", "--max_train_steps", "2", "--save_every_n_steps", "1",
        "--ema", "--ema_decay", "0.5", "--ema_warmup", "none"])
    first, last = load_file(tmp_path / "out-step00000001.safetensors"), load_file(tmp_path / "out.safetensors")
    ema = load_file(tmp_path / "out-ema.safetensors")
    assert set(ema) == set(last)
    changed = [k for k in ema if not torch.equal(first[k], last[k])]
    assert changed  # the UNet trained
    for key in ema:
        torch.testing.assert_close(ema[key], 0.5 * first[key] + 0.5 * last[key], rtol=0, atol=1e-6)


def tiny_model(family, folder):
    if family == "flux":
        from library.tiny_models.flux import save_tiny_flux_pipeline

        return save_tiny_flux_pipeline(folder), ["--t5xxl_max_token_length", "16"]
    if family == "sd3":
        from library.tiny_models.sd3 import save_tiny_sd3_pipeline

        return save_tiny_sd3_pipeline(folder, dual_attention=True), ["--t5xxl_max_token_length", "16"]
    from library.tiny_models.lumina import save_tiny_lumina_pipeline

    return save_tiny_lumina_pipeline(folder), ["--gemma2_max_token_length", "48"]


@pytest.mark.parametrize("family, mode", [("flux", "network"), ("sd3", "full"), ("lumina", "full")])
def test_ema_in_other_families(family, mode, demo_image_root, tmp_path):
    model, family_flags = tiny_model(family, str(tmp_path / "model"))
    network = ["--network_module", "networks.lora", "--network_dim", "2"] if mode == "network" else []
    run_training(family, mode, [
        "--pretrained_model_name_or_path", model, "--train_data_dir", demo_image_root, "--resolution", "64",
        "--output_dir", str(tmp_path / "out"), "--output_name", "out", "--seed", "3", "--train_batch_size", "2",
        "--learning_rate", "1e-3", "--max_train_steps", "2", "--save_every_n_steps", "1", "--cache_latents_to_disk",
        *family_flags, *network, "--ema", "--ema_decay", "0.5", "--ema_warmup", "none"])
    out = tmp_path / "out"
    first, last = load_file(out / "out-step00000001.safetensors"), load_file(out / "out.safetensors")
    ema = load_file(out / "out-ema.safetensors")
    assert set(ema) == set(last) and any(not torch.equal(first[k], last[k]) for k in ema)
    for key in ema:
        torch.testing.assert_close(ema[key], 0.5 * first[key] + 0.5 * last[key], rtol=0, atol=1e-6)
