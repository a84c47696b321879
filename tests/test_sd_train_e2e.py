"""End to end: sd_train_network.py and sd_train.py on a tiny SD1.5-layout model, checking the files.

Most runs call the entry scripts' `run_training` in-process (same code path as the command line,
without paying diffusers' import per run); the CLI itself is exercised in test_cli_errors.py.
"""

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.cli import run_training
from lora_checks import assert_diffusers_applies_every_module

KOHYA_KEY = re.compile(r"lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")


def train(family_mode, model, images, output_dir, *extra):
    run_training("sd", family_mode, [
        "--pretrained_model_name_or_path", model, "--train_data_dir", images, "--resolution", "64",
        "--output_dir", str(output_dir), "--output_name", "out", "--seed", "7", "--train_batch_size", "2",
        "--learning_rate", "1e-3", *extra,
    ])


def run_to_run_tolerance(learning_rate: float, steps: int) -> float:
    """How far two runs with the same seed may drift apart. On the CPU they are bit-identical (0). On CUDA some
    kernels (cuDNN convolution backward) are nondeterministic, and AdamW moves a weight by up to about the
    learning rate per step whatever the gradient's size, so two runs can differ by up to 2 x lr x steps."""
    return 2 * learning_rate * steps if torch.cuda.is_available() else 0.0


def lora_args(*extra):
    return ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2",
            "--network_args", "conv_dim=2", "conv_alpha=1", *extra]


@pytest.fixture(scope="module")
def tiny_sd15_single_file(tiny_sd15_folder, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from library.models.sd_checkpoint import save_sd15_single_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, local_files_only=True)
    return save_sd15_single_file(pipe, str(tmp_path_factory.mktemp("single") / "tiny_sd15.safetensors"))


def tiny_pipeline_from(folder):
    from diffusers import StableDiffusionPipeline

    return lambda: StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def test_lora_from_diffusers_folder_loads_exactly_in_diffusers(tiny_sd15_folder, demo_image_root, tmp_path):
    train("network", tiny_sd15_folder, demo_image_root, tmp_path, *lora_args("--max_train_steps", "3"))
    path = tmp_path / "out.safetensors"
    tensors = load_file(path)
    assert all(KOHYA_KEY.fullmatch(key) for key in tensors)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in tensors
    assert all(tensors[k].abs().sum() > 0 for k in tensors if k.endswith("lora_up.weight"))  # trained
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_steps"] == "3"
    assert metadata["ss_seed"] == "7" and metadata["ss_num_train_images"] == "6"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"1_shape": {"n_repeats": 1, "img_count": 6}}
    checked = assert_diffusers_applies_every_module(tiny_pipeline_from(tiny_sd15_folder), str(path))
    assert checked == len(tensors) // 3


def test_lora_from_single_file_unet_only_with_step_saves(tiny_sd15_single_file, demo_image_root, tmp_path):
    output = tmp_path / "output"
    train("network", tiny_sd15_single_file, demo_image_root, output,
          *lora_args("--max_train_steps", "4", "--network_train_unet_only", "--save_every_n_steps", "1",
                     "--save_last_n_steps", "1", "--cache_latents", "--logging_dir", str(tmp_path / "logs")))
    names = sorted(os.listdir(output))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {root for root, _, files in os.walk(tmp_path / "logs")
                  if any(f.startswith("events.out.tfevents") for f in files)}
    logged = EventAccumulator(event_dirs.pop()).Reload()
    assert [event.step for event in logged.Scalars("loss")] == [1, 2, 3, 4]  # TensorBoard got every step
    # steps 1..3 were saved; as in sd-scripts, --save_last_n_steps 1 keeps the saves of steps >= current - 1,
    # so step 1 was pruned when step 3 was saved; the end save is out.safetensors
    assert names == ["out-step00000002.safetensors", "out-step00000003.safetensors", "out.safetensors"]
    tensors = load_file(output / "out.safetensors")
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)


def test_full_finetune_single_file_and_diffusers_folder_agree(tiny_sd15_folder, demo_image_root, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    common = ["--max_train_steps", "2", "--train_text_encoder", "--learning_rate_te", "5e-4"]
    train("full", tiny_sd15_folder, demo_image_root, tmp_path / "st", *common, "--save_model_as", "safetensors")
    train("full", tiny_sd15_folder, demo_image_root, tmp_path / "df", *common, "--save_model_as", "diffusers")
    single = StableDiffusionPipeline.from_single_file(str(tmp_path / "st" / "out.safetensors"),
                                                      config=tiny_sd15_folder, local_files_only=True)
    folder = StableDiffusionPipeline.from_pretrained(str(tmp_path / "df" / "out"), local_files_only=True)
    original = UNet2DConditionModel.from_pretrained(tiny_sd15_folder, subfolder="unet", local_files_only=True)
    tolerance = run_to_run_tolerance(1e-3, 2)
    for name, weight in folder.unet.state_dict().items():
        torch.testing.assert_close(single.unet.state_dict()[name], weight, atol=tolerance, rtol=0)
    changed = [n for n, w in folder.unet.state_dict().items() if not torch.equal(w, original.state_dict()[n])]
    assert len(changed) > 100  # the fine-tune really changed the UNet
    te_single = single.text_encoder.state_dict()
    for name, weight in folder.text_encoder.state_dict().items():
        torch.testing.assert_close(te_single[name], weight, atol=tolerance, rtol=0)


def test_full_finetune_saved_as_ckpt_loads_back_without_unpickling_code(tiny_sd15_folder, demo_image_root, tmp_path):
    """--save_model_as ckpt (sd-scripts' fine-tune guides): {"state_dict", "epoch", "global_step"} with the
    single file's tensors; torch.load(weights_only=True) and our SD loader read it."""
    from library.models.sd_checkpoint import load_sd_single_file

    common = ["--max_train_steps", "2", "--save_every_n_steps", "1"]
    train("full", tiny_sd15_folder, demo_image_root, tmp_path / "st", *common)
    train("full", tiny_sd15_folder, demo_image_root, tmp_path / "ck", *common, "--save_model_as", "ckpt")
    assert sorted(os.listdir(tmp_path / "ck")) == ["out-step00000001.ckpt", "out.ckpt"]
    checkpoint = torch.load(str(tmp_path / "ck" / "out.ckpt"), map_location="cpu", weights_only=True)
    single = load_file(tmp_path / "st" / "out.safetensors")
    assert checkpoint["global_step"] == 2 and checkpoint["state_dict"].keys() == single.keys()
    assert all(torch.equal(checkpoint["state_dict"][key], single[key]) for key in single)
    loaded = load_sd_single_file(str(tmp_path / "ck" / "out.ckpt"))
    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(loaded.unet.conv_in.weight, single[unet_key])


def test_resume_from_state_matches_uninterrupted_run(tiny_sd15_folder, demo_image_root, tmp_path):
    """Stop after the step-3 state save, resume, and end with the same LoRA as a run never stopped."""
    common = lora_args("--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--shuffle_caption",
                       "--flip_aug", "--caption_dropout_rate", "0.3", "--network_dropout", "0.1",
                       "--save_every_n_steps", "3", "--save_state", "--lr_scheduler", "cosine")
    train("network", tiny_sd15_folder, demo_image_root, tmp_path / "full", *common)
    state = tmp_path / "full" / "out-step00000003-state"
    assert (state / "train_state.json").is_file()
    train("network", tiny_sd15_folder, demo_image_root, tmp_path / "resumed", *common, "--resume", str(state))
    uninterrupted = load_file(tmp_path / "full" / "out.safetensors")
    resumed = load_file(tmp_path / "resumed" / "out.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    worst = max((uninterrupted[k] - resumed[k]).abs().max().item() for k in uninterrupted)
    assert worst <= max(1e-6, run_to_run_tolerance(1e-3, 3))  # steps 4-6 ran twice
    step3 = load_file(tmp_path / "full" / "out-step00000003.safetensors")
    assert any(not torch.equal(step3[k], uninterrupted[k]) for k in step3)  # steps 4-6 did train
    final_state = json.loads((tmp_path / "resumed" / "out-state" / "train_state.json").read_text())
    assert final_state["global_step"] == 6
