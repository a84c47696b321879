"""The LoRA tools on a tiny SDXL: merging into an SGM single file (bigG's fused in_proj included) and a
diffusers folder, and converting layouts with diffusers applying the result exactly."""

import pytest
import torch
from safetensors.torch import load_file

from library.families.sdxl import SDXLFamily
from lora_checks import expected_delta, sdxl_layers_by_kohya_name
from tools.convert_lora import convert_lora
from tools.merge_lora import merge_lora
from tools_fixtures import write_random_lora


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from library.models.sdxl_checkpoint import save_sdxl_single_file
    from library.tiny_models.sdxl import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(str(folder / "model"))
    single = str(folder / "tiny_sdxl.safetensors")
    save_sdxl_single_file(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, single)
    lora = write_random_lora(pipe, folder / "lora.safetensors", seed=5, dim=4, alpha=2, conv_dim=2, family=SDXLFamily())
    return {"pipe": pipe, "folder": str(folder / "model"), "single": single, "lora": lora}


def expected_weights(pipe, lora_path, ratio):
    """{(attribute, module path): W + ratio * alpha / rank * up @ down} from the base pipeline."""
    tensors, layers = load_file(lora_path), sdxl_layers_by_kohya_name(pipe)
    expected = {}
    for name in {key.split(".")[0] for key in tensors}:
        attribute, path = layers[name]
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        weight = getattr(pipe, attribute).get_submodule(path).weight.detach()
        expected[(attribute, path)] = weight + expected_delta(down, up, ratio * tensors[f"{name}.alpha"].item() / down.shape[0])
    return expected


def test_merge_into_sgm_single_file_and_diffusers_folder(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from library.models.sdxl_checkpoint import load_sdxl_single_file

    single_out, folder_out = str(tmp_path / "merged.safetensors"), str(tmp_path / "merged_folder")
    merge_lora(["--sdxl", "--model", sdxl["single"], "--loras", sdxl["lora"], "--ratios", "0.7", "--save_to", single_out])
    merge_lora(["--family", "sdxl", "--model", sdxl["folder"], "--loras", sdxl["lora"], "--ratios", "0.7",
                "--save_to", folder_out])
    expected = expected_weights(sdxl["pipe"], sdxl["lora"], 0.7)
    assert any(attribute == "text_encoder_2" and "q_proj" in path for attribute, path in expected)  # bigG in_proj
    assert any(path.endswith("conv1") for _, path in expected)
    loaded = load_sdxl_single_file(single_out, load_vae=False)
    from_single = {"unet": loaded.unet, "text_encoder": loaded.text_encoder_1, "text_encoder_2": loaded.text_encoder_2}
    from_folder = StableDiffusionXLPipeline.from_pretrained(folder_out, local_files_only=True)
    for (attribute, path), weight in expected.items():
        torch.testing.assert_close(from_single[attribute].get_submodule(path).weight, weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(getattr(from_folder, attribute).get_submodule(path).weight, weight, atol=1e-5, rtol=0)
    before, after = load_file(sdxl["single"]), load_file(single_out)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert len(changed) == len(expected) - 2 * 2  # bigG: q, k and v of each of its 2 layers share one tensor


def test_sdxl_layout_conversions(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    paths = {layout: str(tmp_path / f"{layout}.safetensors") for layout in ("diffusers", "comfy", "back")}
    convert_lora([sdxl["lora"], paths["diffusers"], "--to", "diffusers"])
    convert_lora([paths["diffusers"], paths["comfy"], "--to", "comfy"])
    convert_lora([paths["comfy"], paths["back"], "--to", "kohya"])
    original, back = load_file(sdxl["lora"]), load_file(paths["back"])
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    comfy_keys = load_file(paths["comfy"]).keys()
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in comfy_keys
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.alpha" in comfy_keys

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl["folder"], local_files_only=True)
    expected = expected_weights(pipe, sdxl["lora"], 1.0)
    pipe.load_lora_weights(paths["diffusers"])
    pipe.fuse_lora()
    for (attribute, path), weight in expected.items():
        torch.testing.assert_close(getattr(pipe, attribute).get_submodule(path).weight, weight, atol=1e-5, rtol=0)
