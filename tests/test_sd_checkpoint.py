"""SD checkpoints: single-file and diffusers loading/saving, checked against diffusers' own loaders."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.families.base import ModelComponents
from library.models.checkpoint_detect import detect_checkpoint_family, read_checkpoint_keys
from library.models.sd_checkpoint import (
    load_sd_models,
    load_vae,
    save_sd15_single_file,
    save_sd_diffusers_folder,
    sd_noise_scheduler,
    sd_tokenizer,
)


def assert_same_weights(model_a, model_b):
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture(scope="module")
def pipeline():
    from library.tiny_models.sd import tiny_sd15_pipeline

    return tiny_sd15_pipeline(seed=1)


@pytest.fixture(scope="module")
def single_file(pipeline, tmp_path_factory):
    return save_sd15_single_file(pipeline, str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


@pytest.fixture(scope="module")
def folder(pipeline, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("diffusers") / "tiny")
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_sd2_pipeline():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.tiny_models.sd import tiny_vae
    from library.models.sd_checkpoint import build_sd_pipeline

    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
        attention_head_dim=(1, 1, 1, 1), use_linear_projection=True, upcast_attention=True, norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    ))
    return build_sd_pipeline(unet, tiny_vae(seed=2), text_encoder, sd_tokenizer(v2=True), sd_noise_scheduler(True))


# ---- loading ---------------------------------------------------------------------------------------

def test_folder_and_single_file_load_the_same_weights(pipeline, folder, single_file):
    from_folder = load_sd_models(folder)
    from_file = load_sd_models(single_file)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipeline, part), getattr(from_folder, part))
        assert_same_weights(getattr(pipeline, part), getattr(from_file, part))
    assert not from_file.v2 and not from_folder.v2
    assert from_file.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert from_file.tokenizer.pad_token_id == 49407
    unet_config = from_file.unet.config
    assert list(unet_config.block_out_channels) == [32, 32, 64, 64] and unet_config.attention_head_dim == 8
    assert from_file.text_encoder.config.num_attention_heads == 4
    assert from_file.vae.config.scaling_factor == 0.18215


def test_single_file_uses_real_ldm_names(pipeline, single_file):
    with safe_open(single_file, framework="pt") as f:
        keys = set(f.keys())
        q_shape = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    expected = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # first up block has no attention
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.mid.block_2.conv1.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    }
    assert expected <= keys
    assert len(keys) == sum(len(getattr(pipeline, p).state_dict()) for p in ("unet", "vae", "text_encoder"))
    assert q_shape == [64, 64, 1, 1]
    assert detect_checkpoint_family(keys) == "sd"


def test_diffusers_from_single_file_reads_our_file(pipeline, folder, single_file):
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_single_file(single_file, config=folder, local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipeline, part), getattr(loaded, part))


def test_single_file_round_trip_is_exact(single_file, tmp_path):
    loaded = load_sd_models(single_file)
    again = save_sd15_single_file(loaded, str(tmp_path / "again.safetensors"))
    first, second = load_file(single_file), load_file(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_ckpt_loads_through_weights_only(pipeline, single_file, tmp_path):
    path = str(tmp_path / "tiny.ckpt")
    torch.save({"state_dict": load_file(single_file), "global_step": 10}, path)
    assert_same_weights(pipeline.unet, load_sd_models(path).unet)


def test_ckpt_with_objects_is_refused(tmp_path):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {}, "callback": argparse_namespace()}, path)
    with pytest.raises(UserError, match="convert it to .safetensors"):
        load_sd_models(path)


def argparse_namespace():
    import argparse

    return argparse.Namespace(anything=1)


def test_missing_file_and_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="no such file or folder"):
        load_sd_models(str(tmp_path / "nothing.safetensors"))
    with pytest.raises(UserError, match="the model hub is offline .* someone/some-model is not in the Hugging Face cache"):
        load_sd_models("someone/some-model")


def test_unreachable_hub_is_a_user_error(monkeypatch):
    from library.models import sd_checkpoint

    def no_network(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(sd_checkpoint, "hub_is_offline", lambda: False)
    monkeypatch.setattr(sd_checkpoint, "_load_diffusers_parts", no_network)
    with pytest.raises(UserError, match="downloading it from the model hub failed .*network is unreachable"):
        load_sd_models("someone/some-model")


def test_flux_file_names_the_flux_script(tmp_path):
    path = str(tmp_path / "flux1-dev.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, path)
    assert read_checkpoint_keys(path) == ["double_blocks.0.img_attn.qkv.weight"]
    with pytest.raises(UserError, match=r"looks like a FLUX.1 checkpoint; use flux_train_network.py"):
        load_sd_models(path)
    with pytest.raises(UserError, match=r"looks like a FLUX.1 checkpoint; use flux_train.py"):
        load_sd_models(path, full_finetune=True)


def test_sdxl_folder_names_the_sdxl_script(tmp_path):
    os.makedirs(tmp_path / "xl")
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UserError, match="looks like a SDXL checkpoint; use sdxl_train_network.py"):
        load_sd_models(str(tmp_path / "xl"))


def test_incomplete_single_file_is_refused(single_file, tmp_path):
    state = {k: v for k, v in load_file(single_file).items() if not k.startswith("first_stage_model.")}
    path = str(tmp_path / "no_vae.safetensors")
    save_file(state, path)
    with pytest.raises(UserError, match="has no VAE weights .*add --vae"):
        load_sd_models(path)


@pytest.mark.parametrize("keys, family", [
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "flux"),
    (["transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.proj_out.weight"], "flux"),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "sd3"),
    (["noise_refiner.0.attention.qkv.weight", "cap_embedder.1.weight"], "lumina"),
    (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"], "sdxl"),
    (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.ln_final.weight"], "sd2"),
    (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"], "sd"),
    (["encoder.block.0.layer.0.SelfAttention.q.weight"], "unknown"),
])
def test_detect_checkpoint_family(keys, family):
    assert detect_checkpoint_family(keys) == family


# ---- separate VAE ---------------------------------------------------------------------------------

def test_vae_override_from_bare_ldm_file_and_folder(pipeline, single_file, folder, tmp_path):
    prefix = "first_stage_model."
    bare = {k[len(prefix):]: v for k, v in load_file(single_file).items() if k.startswith(prefix)}
    vae_file = str(tmp_path / "vae.safetensors")
    save_file(bare, vae_file)
    assert_same_weights(pipeline.vae, load_vae(vae_file))
    assert_same_weights(pipeline.vae, load_vae(folder))  # a pipeline folder: its vae/ subfolder
    models = load_sd_models(single_file, vae_source=os.path.join(folder, "vae"))
    assert_same_weights(pipeline.vae, models.vae)


def test_diffusers_layout_vae_file_is_refused(pipeline, tmp_path):
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file(pipeline.vae.state_dict(), path)
    with pytest.raises(UserError, match="diffusers layout; pass the folder"):
        load_vae(path)


# ---- SD 2.x (OpenCLIP text encoder) ----------------------------------------------------------------

def test_sd2_single_file_round_trip(tiny_sd2_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = save_sd15_single_file(tiny_sd2_pipeline, str(tmp_path / "sd2.safetensors"))
    state = load_file(path)
    prefix = "cond_stage_model.model."
    assert state[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert torch.equal(state[prefix + "transformer.resblocks.2.ln_1.weight"],
                       state[prefix + "transformer.resblocks.1.ln_1.weight"])  # the dropped layer's stand-in
    assert torch.equal(state[prefix + "text_projection"], torch.eye(32))
    assert detect_checkpoint_family(state) == "sd2"

    loaded = load_sd_models(path)
    assert loaded.v2 and loaded.tokenizer.pad_token_id == 0
    assert loaded.unet.config.use_linear_projection and list(loaded.unet.config.attention_head_dim) == [1, 1, 1, 1]
    assert loaded.text_encoder.config.hidden_act == "gelu"
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(tiny_sd2_pipeline, part), getattr(loaded, part))

    config_folder = str(tmp_path / "sd2_folder")
    save_sd_diffusers_folder(tiny_sd2_pipeline, config_folder)
    reference = StableDiffusionPipeline.from_single_file(path, config=config_folder, local_files_only=True)
    assert_same_weights(tiny_sd2_pipeline.text_encoder, reference.text_encoder)


# ---- saving through the family ---------------------------------------------------------------------

def components_of(pipeline):
    from library.families.sd import SDComponents

    return SDComponents(
        denoiser=pipeline.unet, vae=pipeline.vae, text_encoders=[pipeline.text_encoder],
        tokenizers=[pipeline.tokenizer], noise_scheduler=sd_noise_scheduler(False), v2=False,
    )


def test_save_full_model_single_file_with_dtype_and_metadata(pipeline, tmp_path):
    from library.families.sd import SDFamily

    path = str(tmp_path / "out.safetensors")
    SDFamily().save_full_model(components_of(pipeline), path, "safetensors", torch.float16, {"ss_steps": 3})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"ss_steps": "3"}
        tensor = f.get_tensor("model.diffusion_model.out.2.weight")
    assert tensor.dtype == torch.float16
    assert torch.equal(tensor, pipeline.unet.conv_out.weight.detach().half())
    assert pipeline.unet.conv_out.weight.dtype == torch.float32  # the training model is untouched
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_save_full_model_diffusers_folder_replaces_atomically(pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    from library.families.sd import SDFamily

    path = tmp_path / "model"
    os.makedirs(path)
    (path / "old.txt").write_text("previous save")
    SDFamily().save_full_model(components_of(pipeline), str(path), "diffusers", torch.float16, {})
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary or backup folders left
    assert not (path / "old.txt").exists()
    loaded = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float16)
    for part in ("unet", "vae", "text_encoder"):
        expected = {k: v.half() for k, v in getattr(pipeline, part).state_dict().items()}
        actual = getattr(loaded, part).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), part
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.tokenizer("a cat").input_ids == pipeline.tokenizer("a cat").input_ids
