"""End to end: sdxl_train_network.py and sdxl_train.py on a tiny SDXL-layout model, checking what they wrote.

LoRA files are checked in diffusers' StableDiffusionXLPipeline (every module applied exactly, names
mapped to layers independently of our code); full fine-tunes through `from_single_file` and
`from_pretrained`. Runs are in-process (same code path as the command line); one test runs the
script itself.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_script
from library.cli import run_training
from library.config.arguments import parse_training_args
from library.families import get_family
from library.training.trainer import Trainer
from lora_checks import assert_diffusers_applies_every_module, sdxl_layers_by_kohya_name

KOHYA_KEY = re.compile(r"lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """(pipeline in memory, its diffusers folder, the same weights as an SGM single file)."""
    from library.models.sdxl_checkpoint import save_sdxl_single_file
    from library.tiny_models.sdxl import tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("tiny_sdxl")
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(str(root / "folder"))
    single = str(root / "tiny_sdxl.safetensors")
    save_sdxl_single_file(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, single)
    return pipe, str(root / "folder"), single


def argv(model, images, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", images, "--resolution", "64",
            "--output_dir", str(output_dir), "--output_name", "out", "--seed", "7", "--train_batch_size", "2",
            "--learning_rate", "1e-3", *extra]


def lora_args(*extra):
    return ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2",
            "--network_args", "conv_dim=2", "conv_alpha=1", *extra]


def pipeline_from(folder):
    from diffusers import StableDiffusionXLPipeline

    return lambda: StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)


def assert_same_weights(model, reference):
    reference = reference.state_dict()
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(weight, reference[name].to(weight.device), atol=0, rtol=0, msg=name)


def test_lora_unet_and_both_text_encoders_load_exactly_in_diffusers(tiny_sdxl, demo_image_root, tmp_path):
    _, folder, _ = tiny_sdxl
    run_training("sdxl", "network", argv(folder, demo_image_root, tmp_path, *lora_args("--max_train_steps", "3")))
    path = tmp_path / "out.safetensors"
    tensors = load_file(path)
    assert all(KOHYA_KEY.fullmatch(key) for key in tensors)
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_output_blocks_2_2_conv",
                 "lora_unet_middle_block_0_in_layers_2", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_1_mlp_fc1"):
        assert f"{name}.lora_up.weight" in tensors, name
    untrained = sorted(k.split(".")[0] for k in tensors if k.endswith("lora_up.weight") and not tensors[k].any())
    # CLIP-L's last layer feeds nothing SDXL reads (hidden state 11 of 12), as in sd-scripts its LoRA stays zero
    assert untrained and all(name.startswith("lora_te1_text_model_encoder_layers_1_") for name in untrained)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_steps"] == "3"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    checked = assert_diffusers_applies_every_module(pipeline_from(folder), str(path), sdxl_layers_by_kohya_name)
    assert checked == len(tensors) // 3 == 281


def test_single_file_loads_like_the_folder_and_trains_with_cached_outputs(tiny_sdxl, demo_image_root, tmp_path):
    from library.models.sdxl_checkpoint import load_sdxl_models

    pipe, _, single = tiny_sdxl
    models = load_sdxl_models(single)
    pairs = ((models.unet, pipe.unet), (models.vae, pipe.vae), (models.text_encoder_1, pipe.text_encoder),
             (models.text_encoder_2, pipe.text_encoder_2))
    for ours, reference in pairs:
        assert_same_weights(ours, reference)
    def public_config(model):
        return {k: v for k, v in json.loads(json.dumps(dict(model.config))).items() if not k.startswith("_")}

    assert public_config(models.unet) == {**public_config(pipe.unet), "sample_size": 128}
    assert models.vae.config.scaling_factor == 0.13025

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --n blurry\n")
    run_training("sdxl", "network", argv(single, demo_image_root, tmp_path, *lora_args(
        "--max_train_steps", "2", "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "1")))
    tensors = load_file(tmp_path / "out.safetensors")
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    assert all(tensors[k].any() for k in tensors if k.endswith("lora_up.weight"))
    samples = sorted(p.name for p in (tmp_path / "sample").iterdir())
    assert [name[:14] for name in samples] == ["out_000001_00_", "out_000001_con", "out_000002_00_", "out_000002_con"]


def test_full_finetune_single_file_and_diffusers_folder_hold_the_trained_weights(tiny_sdxl, demo_image_root, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe, folder, single = tiny_sdxl
    family, args = parse_training_args(get_family("sdxl"), "full", argv(
        single, demo_image_root, tmp_path, "--max_train_steps", "2", "--train_text_encoder", "--learning_rate_te1", "0",
        "--learning_rate_te2", "5e-4"))
    trainer = Trainer(family, args)
    trainer.train()
    trained = trainer.run.components
    loaded = StableDiffusionXLPipeline.from_single_file(str(tmp_path / "out.safetensors"), config=folder,
                                                        local_files_only=True)
    for name, part in (("unet", trained.denoiser), ("vae", trained.vae), ("text_encoder", trained.text_encoders[0]),
                       ("text_encoder_2", trained.text_encoders[1])):
        assert_same_weights(getattr(loaded, name), part)
    assert_same_weights(pipe.text_encoder, trained.text_encoders[0])  # --learning_rate_te1 0: frozen
    for before, after in ((pipe.unet, trained.denoiser), (pipe.text_encoder_2, trained.text_encoders[1])):
        changed = [n for n, w in after.state_dict().items() if not torch.equal(w.cpu(), before.state_dict()[n])]
        assert len(changed) > 20
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"

    family.save_full_model(trained, str(tmp_path / "folder_out"), "diffusers", torch.float32, {})
    saved = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "folder_out"), local_files_only=True)
    assert_same_weights(saved.unet, trained.denoiser)
    assert_same_weights(saved.text_encoder_2, trained.text_encoders[1])
    assert saved.tokenizer_2.pad_token == "!"
    model_index = json.loads((tmp_path / "folder_out" / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionXLPipeline"


def test_sd15_checkpoint_is_refused_naming_the_right_script(demo_image_root, tmp_path, capsys):
    sd_file = str(tmp_path / "v1-5.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1)}, sd_file)
    with pytest.raises(SystemExit) as exit_info:
        run_training("sdxl", "network", argv(sd_file, demo_image_root, tmp_path / "out"))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.endswith("looks like a Stable Diffusion 1.x checkpoint; use sd_train_network.py")


@pytest.mark.parametrize("script", ["sdxl_train_network.py", "sdxl_train.py"])
def test_entry_scripts_answer_help(script):
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "SDXL model" in result.stdout and "--v_parameterization" in result.stdout
    assert "--learning_rate_te1" in result.stdout
    assert ("--network_dim" in result.stdout) == (script == "sdxl_train_network.py")


def test_fused_backward_pass_trains_the_same_weights_with_the_text_encoder(tiny_sdxl, demo_image_root, tmp_path,
                                                                          monkeypatch):
    """sdxl_train.py --fused_backward_pass (Adafactor stepped per weight inside backward; UNet and bigG) ==
    the plain step after backward."""
    from library.training import fused_backward

    stepped, step_only = [], fused_backward.step_only
    monkeypatch.setattr(fused_backward, "step_only", lambda *a: stepped.append(1) or step_only(*a))
    _, folder, _ = tiny_sdxl
    common = ["--max_train_steps", "2", "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
              "scale_parameter=False", "--max_grad_norm", "0", "--train_text_encoder", "--learning_rate_te1", "0"]
    results = []
    for name, extra in (("plain", []), ("fused", ["--fused_backward_pass"])):
        family, args = parse_training_args(get_family("sdxl"), "full", argv(folder, demo_image_root, tmp_path / name,
                                                                            *common, *extra))
        trainer = Trainer(family, args)
        trainer.train()
        results.append(trainer.run.components)
    plain, fused = results
    assert_same_weights(fused.denoiser, plain.denoiser)
    assert_same_weights(fused.text_encoders[1], plain.text_encoders[1])
    assert stepped  # the hooks stepped: an ignored flag would match the plain run too
