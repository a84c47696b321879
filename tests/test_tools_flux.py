"""The LoRA tools on a tiny FLUX.1: merging BFL-named (fused qkv / linear1) LoRAs into a BFL file plus
the separate CLIP-L and T5 files, and into a diffusers folder (each layer taking its rows of the fused
update); converting layouts losslessly, with diffusers applying the PEFT layout exactly."""

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.families.base import ModelComponents
from library.families.flux import FluxFamily, FluxLoraSettings, FluxSettings
from tools.convert_lora import convert_lora
from tools.merge_lora import merge_lora


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from library.tiny_models.sd import tiny_clip_text_model
    from library.tiny_models.flux import (
        save_tiny_flux_pipeline, save_tiny_flux_single_files, tiny_flux_transformer, tiny_t5_encoder,
    )
    from networks.lora import create_network

    folder = tmp_path_factory.mktemp("flux")
    files = save_tiny_flux_single_files(str(folder / "single"))
    family = FluxFamily(FluxSettings(lora=FluxLoraSettings({"train_t5xxl": "True"})))
    parts = ModelComponents(denoiser=tiny_flux_transformer(), vae=None, noise_scheduler=None,
                            text_encoders=[tiny_clip_text_model(), tiny_t5_encoder()], tokenizers=[None, None])
    network = create_network(family.lora_targets(parts), network_dim=4, network_alpha=2)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    lora = str(folder / "lora.safetensors")
    network.save_weights(lora, None, {})
    return {**files, "folder": save_tiny_flux_pipeline(str(folder / "pipeline")), "lora": lora}


def by_kohya_name(state: dict, prefix: str) -> dict:
    """kohya module name -> weight key, from the file's own names (independent of library/)."""
    return {prefix + key[: -len(".weight")].replace(".", "_"): key for key in state if key.endswith(".weight")}


def expected_merge(files: dict, lora_path: str, ratio: float) -> dict:
    """{file role: {key: W + ratio * alpha / rank * up @ down}} for the BFL, CLIP-L and T5 files."""
    lora = load_file(lora_path)
    expected = {}
    for role, prefix in (("transformer", "lora_unet_"), ("clip_l", "lora_te1_"), ("t5xxl", "lora_te3_")):
        state = load_file(files[role])
        keys = by_kohya_name(state, prefix)
        expected[role] = {}
        for name in {k.split(".")[0] for k in lora if k.startswith(prefix)}:
            down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
            key = keys[name]
            expected[role][key] = state[key] + ratio * lora[f"{name}.alpha"].item() / down.shape[0] * up @ down
    return expected


def test_merge_into_bfl_and_text_encoder_files_and_into_a_diffusers_folder(flux, tmp_path):
    from diffusers import FluxTransformer2DModel

    from library.models.flux_checkpoint import load_flux_transformer

    out = {role: str(tmp_path / f"{role}.safetensors") for role in ("transformer", "clip_l", "t5xxl")}
    merge_lora(["--flux", "--model", flux["transformer"], "--loras", flux["lora"], "--ratios", "0.6",
                "--text_encoders", flux["clip_l"], flux["t5xxl"], "--save_to", out["transformer"],
                "--save_text_encoders_to", out["clip_l"], out["t5xxl"]])
    expected = expected_merge(flux, flux["lora"], 0.6)
    assert "double_blocks.0.img_attn.qkv.weight" in expected["transformer"]
    assert "single_blocks.1.linear1.weight" in expected["transformer"]
    for role, tensors in expected.items():
        merged = load_file(out[role])
        assert tensors
        for key, weight in tensors.items():
            torch.testing.assert_close(merged[key], weight, atol=1e-5, rtol=0)

    folder_out = str(tmp_path / "folder")
    merge_lora(["--family", "flux", "--model", flux["folder"], "--loras", flux["lora"], "--ratios", "0.6",
                "--save_to", folder_out])
    from_folder = FluxTransformer2DModel.from_pretrained(folder_out, subfolder="transformer").state_dict()
    from_bfl, _ = load_flux_transformer(out["transformer"])
    for key, weight in from_bfl.state_dict().items():
        torch.testing.assert_close(from_folder[key], weight, atol=1e-5, rtol=0)


def test_sd_scripts_flux_merge_command_line_writes_what_our_flags_write(flux, tmp_path):
    """flux_merge_lora.py's --flux_model (selects FLUX), --models, --clip_l/--t5xxl with their --*_save_to and
    --working_device land on the same merge as --flux --model --loras --text_encoders --save_text_encoders_to."""
    roles = ("transformer", "clip_l", "t5xxl")
    ours = {role: str(tmp_path / f"ours_{role}.safetensors") for role in roles}
    theirs = {role: str(tmp_path / f"theirs_{role}.safetensors") for role in roles}
    merge_lora(["--flux", "--model", flux["transformer"], "--loras", flux["lora"], "--ratios", "0.6",
                "--text_encoders", flux["clip_l"], flux["t5xxl"], "--save_to", ours["transformer"],
                "--save_text_encoders_to", ours["clip_l"], ours["t5xxl"]])
    merge_lora(["--flux_model", flux["transformer"], "--models", flux["lora"], "--ratios", "0.6",
                "--clip_l", flux["clip_l"], "--clip_l_save_to", theirs["clip_l"], "--t5xxl", flux["t5xxl"],
                "--t5xxl_save_to", theirs["t5xxl"], "--save_to", theirs["transformer"], "--working_device", "cpu"])
    for role in roles:
        expected, got, original = load_file(ours[role]), load_file(theirs[role]), load_file(flux[role])
        assert expected.keys() == got.keys()
        assert any(not torch.equal(expected[key], original[key]) for key in expected), role  # the LoRA landed
        for key, weight in expected.items():
            assert torch.equal(got[key], weight), key


def test_text_encoder_modules_without_their_files_are_an_error(flux, tmp_path):
    with pytest.raises(UserError, match="need the text-encoder files: --text_encoders clip_l.safetensors t5xxl"):
        merge_lora(["--flux", "--model", flux["transformer"], "--loras", flux["lora"],
                    "--save_to", str(tmp_path / "m.safetensors")])


def test_flux_layout_conversions_and_diffusers_applies_them(flux, tmp_path):
    from diffusers import FluxPipeline

    from library.models.flux_checkpoint import load_flux_transformer

    from safetensors.torch import save_file

    paths = {name: str(tmp_path / f"{name}.safetensors") for name in ("diffusers", "comfy", "back", "merged", "clip")}
    convert_lora([flux["lora"], paths["diffusers"], "--to", "diffusers"])
    convert_lora([paths["diffusers"], paths["comfy"], "--to", "comfy"])
    convert_lora([paths["comfy"], paths["back"], "--to", "kohya"])
    original, back = load_file(flux["lora"]), load_file(paths["back"])
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    peft = load_file(paths["diffusers"])
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in peft
    assert "diffusion_model.double_blocks.1.txt_attn.qkv.lora_up.weight" in load_file(paths["comfy"])

    # diffusers' own loader applies every module of the PEFT file as merging the kohya file does
    # (FluxPipeline loads no T5 LoRA, so that part is left out here)
    no_t5, no_t5_peft = str(tmp_path / "no_t5.safetensors"), str(tmp_path / "no_t5_peft.safetensors")
    save_file({k: v for k, v in original.items() if not k.startswith("lora_te3_")}, no_t5)
    convert_lora([no_t5, no_t5_peft, "--to", "diffusers"])
    merge_lora(["--flux", "--model", flux["transformer"], "--loras", no_t5, "--save_to", paths["merged"],
                "--text_encoders", flux["clip_l"], "--save_text_encoders_to", paths["clip"]])
    pipe = FluxPipeline.from_pretrained(flux["folder"], local_files_only=True)
    pipe.load_lora_weights(no_t5_peft)
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    merged, _ = load_flux_transformer(paths["merged"])
    fused = pipe.transformer.state_dict()
    for key, weight in merged.state_dict().items():
        torch.testing.assert_close(fused[key], weight, atol=1e-5, rtol=0)
    clip = load_file(paths["clip"])
    for key, weight in pipe.text_encoder.state_dict().items():
        torch.testing.assert_close(weight, clip.get(key, clip.get("text_model." + key)), atol=1e-5, rtol=0)


def test_cache_latents_needs_only_the_ae(flux, demo_image_root):
    """`cache_latents.py --family flux --ae ae.safetensors`: no transformer file given or loaded."""
    import os

    from tools.cache_latents import cache_latents

    argv = ["--family", "flux", "--ae", flux["ae"], "--train_data_dir", demo_image_root, "--resolution", "64"]
    assert cache_latents(argv).encoded == 6
    files = [name for _, _, names in os.walk(demo_image_root) for name in names if name.endswith("_flux.safetensors")]
    assert len(files) == 6
    assert (cache_latents(argv).encoded, cache_latents(argv).reused) == (0, 6)
