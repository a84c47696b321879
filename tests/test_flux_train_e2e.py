"""End to end: flux_train_network.py on a tiny FLUX.1, from a diffusers folder and from BFL single files.

Runs are in-process (`run_training`, the entry script's code path); one test runs the script itself.
LoRA files are checked in diffusers' FluxPipeline (a loader we did not write): every transformer
module but the single blocks' `linear1` and every CLIP-L module is applied exactly. diffusers splits
`linear1` with the real model's hard-coded widths (3072 x 3 + 12288), so at tiny width it cannot load
it; those modules are checked by our own fused-weight math in test_flux_lora.py
(test_hooks_equal_the_bfl_merge_of_the_file), and here only for presence and training.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_script, save_in_hub_cache
from library.cli import run_training

BFL_KEY = re.compile(
    r"lora_(unet_(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)"
    r"|single_blocks_\d+_(linear1|linear2|modulation_lin))"
    r"|te1_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12]))"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)"
)
HEADLINE_FLAGS = ["--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
                  "--guidance_scale", "1.0", "--fp8_base", "--gradient_checkpointing"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from library.tiny_models.flux import save_tiny_flux_pipeline, save_tiny_flux_single_files

    root = tmp_path_factory.mktemp("tiny_flux")
    return save_tiny_flux_pipeline(str(root / "folder")), save_tiny_flux_single_files(str(root / "files"))


def train(model_args, images, output_dir, *extra):
    run_training("flux", "network", [
        *model_args, "--train_data_dir", images, "--resolution", "64", "--output_dir", str(output_dir),
        "--output_name", "out", "--seed", "7", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2",
        "--t5xxl_max_token_length", "16", "--cache_latents_to_disk", *extra,
    ])


def assert_diffusers_applies(folder, lora_path, tmp_path) -> int:
    """Load the file (without single-block linear1) in FluxPipeline; fused weights == W + alpha/r * up @ down."""
    from diffusers import FluxPipeline

    from library.models.flux_checkpoint import DOUBLE_BLOCK_LINEARS, SINGLE_BLOCK_LINEARS

    tensors = {k: v for k, v in load_file(lora_path).items() if "_linear1." not in k}
    filtered = str(tmp_path / "without_linear1.safetensors")
    save_file(tensors, filtered)
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    layers = {}  # kohya name -> [(root, path, rows)] built from the BFL tables, independent of networks/
    for lists, table, count in (("transformer_blocks", DOUBLE_BLOCK_LINEARS, 2), ("single_transformer_blocks", SINGLE_BLOCK_LINEARS, 2)):
        bfl = "double_blocks" if lists == "transformer_blocks" else "single_blocks"
        for i in range(count):
            for name, members in table.items():
                size = 32  # tiny inner width: each q/k/v member has 32 rows
                layers[f"lora_unet_{bfl}_{i}_{name.replace('.', '_')}"] = [
                    (pipe.transformer, f"{lists}.{i}.{m}", (j * size, (j + 1) * size) if len(members) > 1 else None)
                    for j, m in enumerate(members)]
    for path, module in pipe.text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers["lora_te1_text_model_" + path.replace(".", "_")] = [(pipe.text_encoder, path, None)]
    names = sorted({key.split(".")[0] for key in tensors})
    before = {(id(r), p): r.get_submodule(p).weight.detach().clone() for n in names for r, p, _ in layers[n]}
    pipe.load_lora_weights(filtered)
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        delta = tensors[f"{name}.alpha"].item() / down.shape[0] * up @ down
        for root, path, rows in layers[name]:
            expected = before[(id(root), path)] + (delta if rows is None else delta[rows[0]:rows[1]])
            torch.testing.assert_close(root.get_submodule(path).weight.detach(), expected, rtol=0, atol=1e-5)
    return len(names)


def test_diffusers_folder_with_cached_latents_and_text_outputs(tiny_flux, demo_image_root, tmp_path):
    folder, _ = tiny_flux
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --g 2.5 --d 1\n")
    train(["--pretrained_model_name_or_path", folder], demo_image_root, tmp_path / "out", "--max_train_steps", "3",
          "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only", "--apply_t5_attn_mask",
          "--network_args", "train_blocks=all", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3",
          *HEADLINE_FLAGS)
    samples = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert len(samples) == 2 and samples[0].startswith("out_000003_00_") and samples[1].endswith("contact_sheet.png")
    path = tmp_path / "out" / "out.safetensors"
    tensors = load_file(path)
    assert all(BFL_KEY.fullmatch(key) for key in tensors) and len(tensors) == 3 * (2 * 10 + 2 * 3)
    assert all(tensors[k].abs().sum() > 0 for k in tensors if k.endswith("lora_up.weight"))  # all trained
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 128, 4)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "flux1" and metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert json.loads(metadata["ss_network_args"]) == {"train_blocks": "all"} and metadata["ss_steps"] == "3"
    caches = sorted(p.name for p in (tmp_path / "images").rglob("*.safetensors"))
    assert len([c for c in caches if c.endswith("_flux.safetensors")]) == 6  # latents
    assert len([c for c in caches if c.endswith("_flux_te.safetensors")]) == 6  # text-encoder outputs
    assert assert_diffusers_applies(folder, str(path), tmp_path) == 2 * 10 + 2 * 2


def test_bfl_single_files_with_text_encoder_lora(tiny_flux, demo_image_root, tmp_path, monkeypatch, capsys):
    """No --t5_tokenizer: offline, google/t5-v1_1-xxl comes from the user's Hugging Face cache."""
    from library.models.t5_tokenizer import T5_HUB_ID, load_t5_tokenizer
    from tools.show_metadata import show_metadata

    folder, files = tiny_flux
    save_in_hub_cache(str(tmp_path / "hf" / "hub"), T5_HUB_ID, load_t5_tokenizer(files["t5_tokenizer"]).save_pretrained)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    model_args = ["--pretrained_model_name_or_path", files["transformer"], "--clip_l", files["clip_l"],
                  "--t5xxl", files["t5xxl"], "--ae", files["ae"]]
    train(model_args, demo_image_root, tmp_path / "out", "--max_train_steps", "2", "--timestep_sampling", "flux_shift",
          "--weighting_scheme", "none", "--network_args", "train_blocks=double", "--apply_t5_attn_mask")
    show_metadata([str(tmp_path / "out" / "out.safetensors")])
    shown = capsys.readouterr().out
    for line in ("ss_timestep_sampling: flux_shift", "ss_model_prediction_type: raw", "ss_discrete_flow_shift: 3.0",
                 "ss_sigmoid_scale: 1.0", "ss_weighting_scheme: none", "ss_guidance_scale: 3.5",
                 "ss_apply_t5_attn_mask: True", "ss_logit_mean: 0.0", "ss_mode_scale: 1.29"):
        assert line in shown, line
    tensors = load_file(tmp_path / "out" / "out.safetensors")
    assert all(BFL_KEY.fullmatch(key) for key in tensors)
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1"}
    assert not any("single_blocks" in k for k in tensors)
    assert assert_diffusers_applies(folder, str(tmp_path / "out" / "out.safetensors"), tmp_path) == 2 * 10 + 2 * 6


def test_schnell_defaults_and_rejections(tmp_path, demo_image_root):
    from library.config.arguments import parse_training_args
    from library.errors import UserError
    from library.families import get_family
    from library.tiny_models.flux import save_tiny_flux_pipeline

    folder = save_tiny_flux_pipeline(str(tmp_path / "schnell"), guidance_embeds=False)
    common = ["--pretrained_model_name_or_path", folder, "--output_dir", str(tmp_path), "--train_data_dir",
              demo_image_root]
    family, args = parse_training_args(get_family("flux"), "network", common)
    components = family.load(args)
    assert components.is_schnell and family.t5_max_length(components) == 256
    assert family.modelspec_architecture(components) == "flux-1-schnell"
    family, args = parse_training_args(get_family("flux"), "network", [*common, "--guidance_scale", "3.5"])
    with pytest.raises(UserError, match="--guidance_scale has no effect: this is a FLUX.1 schnell model"):
        family.load(args)
    with pytest.raises(SystemExit) as exit_info:
        run_training("flux", "network", [*common, "--blocks_to_swap", "1", "--network_module", "networks.lora"])
    assert exit_info.value.code == 2


def test_script_rejects_ddpm_flags(tiny_flux, tmp_path):
    folder, _ = tiny_flux
    result = run_script("flux_train_network.py", "--pretrained_model_name_or_path", folder, "--output_dir",
                        str(tmp_path), "--train_data_dir", str(tmp_path), "--min_snr_gamma", "5")
    assert result.returncode == 2
    assert "error: --min_snr_gamma belongs to DDPM training (SD 1.x/2.x, SDXL); FLUX.1 trains with flow matching" \
        in result.stderr
    assert "Traceback" not in result.stderr
