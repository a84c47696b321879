"""End to end: sd3_train_network.py / sd3_train.py on tiny SD3 (SAI single file) and SD3.5 (diffusers folder,
dual attention, RMS qk-norm) models, with cached latents and cached text-encoder outputs.

LoRA files are checked in diffusers' StableDiffusion3Pipeline (a loader we did not write): every module of
the diffusers-layout file is applied exactly (fused weights == W + B @ A, and they changed), the kohya
file converts to the diffusers layout (loaded the same way) and back bit-exactly.
"""

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_script
from library.cli import run_training

KOHYA_KEY = re.compile(
    r"lora_(unet_joint_blocks_\d+_(x_block_(attn2?_(qkv|proj)|mlp_fc[12]|adaLN_modulation_1)"
    r"|context_block_(attn_(qkv|proj)|mlp_fc[12]|adaLN_modulation_1))"
    r"|te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12]))"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)"
)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from library.tiny_models.sd3 import save_tiny_sd3_pipeline, save_tiny_sd3_single_file

    root = tmp_path_factory.mktemp("tiny_sd3")
    return save_tiny_sd3_pipeline(str(root / "folder35"), dual_attention=True), \
        save_tiny_sd3_single_file(str(root / "files"))


def train(mode, model_args, images, output_dir, *extra):
    common = ["--train_data_dir", images, "--resolution", "64", "--output_dir", str(output_dir),
              "--output_name", "out", "--seed", "7", "--train_batch_size", "2", "--learning_rate", "1e-3",
              "--t5xxl_max_token_length", "16", "--cache_latents_to_disk"]
    network = ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2"]
    run_training("sd3", mode, [*model_args, *common, *(network if mode == "network" else []), *extra])


def assert_diffusers_applies(folder, lora_path) -> int:
    """StableDiffusion3Pipeline.load_lora_weights + fuse: each layer == before + (alpha/r) B @ A."""
    import json

    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open

    tensors = load_file(lora_path)
    with safe_open(lora_path, "pt") as f:
        config = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    paths = sorted({k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")})

    def layer(path):
        component, rest = path.split(".", 1)
        return getattr(pipe, component).get_submodule(rest)

    before = {p: layer(p).weight.detach().clone() for p in paths}
    pipe.load_lora_weights(lora_path)
    pipe.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"])
    pipe.unload_lora_weights()
    for path in paths:
        down, up = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
        component = path.split(".")[0]
        alpha = config.get(f"{component}.lora_alpha", down.shape[0])
        for pattern, value in config.get(f"{component}.alpha_pattern", {}).items():
            if path.endswith(pattern):
                alpha = value
        after = layer(path).weight.detach()
        torch.testing.assert_close(after, before[path] + alpha / down.shape[0] * up @ down, rtol=0, atol=1e-5)
        assert torch.equal(after, before[path]) == (up.abs().sum() == 0)  # a silent ignore would leave W as is
    return len(paths)


def test_sd35_folder_diffusers_lora_loads_in_diffusers(tiny_sd3, demo_image_root, tmp_path):
    folder, _ = tiny_sd3
    train("network", ["--pretrained_model_name_or_path", folder], demo_image_root, tmp_path / "out",
          "--max_train_steps", "3", "--network_train_unet_only", "--cache_text_encoder_outputs_to_disk", "--save_lora_format", "diffusers",
          "--clip_l_dropout_rate", "0.5", "--t5_dropout_rate", "0.5", "--weighting_scheme", "logit_normal",
          "--training_shift", "3.0", "--apply_lg_attn_mask", "--apply_t5_attn_mask")
    tensors = load_file(tmp_path / "out" / "out.safetensors")
    assert all(k.startswith("transformer.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)
    # block 0: q,k,v x3 (attn, context, attn2) + 2 out + 1 context out + 4 ff + 2 adaLN; block 1 (pre-only):
    # q,k,v x2, out, 2 ff, adaLN (its context adaLN is left out)
    assert len(tensors) == 2 * ((9 + 3 + 4 + 2) + (6 + 1 + 2 + 1))
    caches = sorted(p.name for p in (tmp_path / "images").rglob("*.safetensors"))
    assert len([c for c in caches if c.endswith("_sd3.safetensors")]) == 6
    assert len([c for c in caches if c.endswith("_sd3_te.safetensors")]) == 6
    # the pre-only block's context query only shapes context outputs the model discards: it gets no gradient
    untrained = [k for k, v in tensors.items() if k.endswith("lora_B.weight") and not v.abs().sum()]
    assert untrained == ["transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"]
    assert assert_diffusers_applies(folder, str(tmp_path / "out" / "out.safetensors")) == 28


def test_single_file_kohya_lora_converts_both_ways(tiny_sd3, demo_image_root, tmp_path):
    from library.families import get_family
    from library.lora_formats import convert_lora_file
    from library.tiny_models.sd3 import save_tiny_sd3_pipeline

    _, files = tiny_sd3
    model_args = ["--pretrained_model_name_or_path", files["checkpoint"], "--t5_tokenizer", files["t5_tokenizer"]]
    train("network", model_args, demo_image_root, tmp_path / "out", "--max_train_steps", "2",
          "--clip_g_dropout_rate", "0.3", "--min_timestep", "100", "--max_timestep", "900",
          "--weighting_scheme", "logit_normal", "--logit_std", "1.2", "--apply_lg_attn_mask")
    path = str(tmp_path / "out" / "out.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert {key: metadata[key] for key in ("ss_weighting_scheme", "ss_logit_mean", "ss_logit_std", "ss_mode_scale",
                                           "ss_min_timestep", "ss_max_timestep", "ss_training_shift",
                                           "ss_apply_lg_attn_mask", "ss_apply_t5_attn_mask")} == {
        "ss_weighting_scheme": "logit_normal", "ss_logit_mean": "0.0", "ss_logit_std": "1.2", "ss_mode_scale": "1.29",
        "ss_min_timestep": "100", "ss_max_timestep": "900", "ss_training_shift": "1.0",
        "ss_apply_lg_attn_mask": "True", "ss_apply_t5_attn_mask": "False"}
    tensors = load_file(path)
    assert all(KOHYA_KEY.fullmatch(k) for k in tensors)
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (3 * 32, 4)
    family = get_family("sd3")
    convert_lora_file(path, str(tmp_path / "peft.safetensors"), "diffusers", family)
    convert_lora_file(str(tmp_path / "peft.safetensors"), str(tmp_path / "back.safetensors"), "kohya", family)
    back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    folder = save_tiny_sd3_pipeline(str(tmp_path / "folder"))  # the same weights as the single file
    assert assert_diffusers_applies(folder, str(tmp_path / "peft.safetensors")) == (6 + 2 + 4 + 2) + (6 + 1 + 2 + 1) + 2 * 2 * 6


def test_full_finetune_writes_a_single_file_that_loads_back(tiny_sd3, demo_image_root, tmp_path):
    from library.models.sd3_checkpoint import load_sd3_single_file

    _, files = tiny_sd3
    model_args = ["--pretrained_model_name_or_path", files["checkpoint"], "--t5_tokenizer", files["t5_tokenizer"]]
    train("full", model_args, demo_image_root, tmp_path / "out", "--max_train_steps", "2",
          "--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
          "warmup_init=False", "--gradient_checkpointing", "--cache_text_encoder_outputs_to_disk")
    saved = load_sd3_single_file(str(tmp_path / "out" / "out.safetensors"))
    original = load_sd3_single_file(files["checkpoint"])
    new, old = saved.transformer.state_dict(), original.transformer.state_dict()
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in new)
    assert all(torch.equal(a, b) for a, b in zip(saved.vae.state_dict().values(), original.vae.state_dict().values()))
    assert all(encoder is not None for encoder in saved.text_encoders)


def test_full_finetune_saved_as_diffusers_and_ckpt_hold_the_trained_weights(tiny_sd3, demo_image_root, tmp_path):
    """--save_model_as diffusers_safetensors: a StableDiffusion3Pipeline folder; ckpt: sd-scripts' torch
    file with the SAI single file's tensors. Same seed, same weights as the safetensors run."""
    from diffusers import StableDiffusion3Pipeline

    from library.models.sd3_checkpoint import load_sd3_single_file

    _, files = tiny_sd3
    model_args = ["--pretrained_model_name_or_path", files["checkpoint"], "--t5_tokenizer", files["t5_tokenizer"]]
    common = ["--max_train_steps", "2", "--cache_text_encoder_outputs_to_disk"]
    train("full", model_args, demo_image_root, tmp_path / "st", *common)
    train("full", model_args, demo_image_root, tmp_path / "df", *common, "--save_model_as", "diffusers_safetensors")
    train("full", model_args, demo_image_root, tmp_path / "ck", *common, "--save_model_as", "ckpt")
    single_path = str(tmp_path / "st" / "out.safetensors")
    trained = load_sd3_single_file(single_path).transformer.state_dict()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "df" / "out"), local_files_only=True)
    folder = pipe.transformer.state_dict()
    assert folder.keys() == trained.keys() and all(torch.equal(folder[k], trained[k]) for k in folder)
    checkpoint = torch.load(str(tmp_path / "ck" / "out.ckpt"), map_location="cpu", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 2)
    single = load_file(single_path)
    assert checkpoint["state_dict"].keys() == single.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], single[k]) for k in single)


def test_network_script_runs_and_rejects_flux_flags(tiny_sd3, demo_image_root, tmp_path):
    folder, _ = tiny_sd3
    bad = run_script("sd3_train_network.py", "--pretrained_model_name_or_path", folder, "--train_data_dir",
                     demo_image_root, "--output_dir", str(tmp_path), "--network_module", "networks.lora",
                     "--noise_offset", "0.1")
    assert bad.returncode == 2 and "--noise_offset belongs to DDPM training" in bad.stderr


def test_fused_backward_pass_trains_the_same_weights(tiny_sd3, demo_image_root, tmp_path, monkeypatch):
    """--fused_backward_pass (Adafactor stepped per parameter inside backward) == the plain step after backward."""
    from library.training import fused_backward

    stepped, step_only = [], fused_backward.step_only
    monkeypatch.setattr(fused_backward, "step_only", lambda *a: stepped.append(1) or step_only(*a))
    _, files = tiny_sd3
    model_args = ["--pretrained_model_name_or_path", files["checkpoint"], "--t5_tokenizer", files["t5_tokenizer"]]
    common = ["--max_train_steps", "2", "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
              "scale_parameter=False", "--max_grad_norm", "0", "--cache_text_encoder_outputs_to_disk"]
    train("full", model_args, demo_image_root, tmp_path / "plain", *common)
    train("full", model_args, demo_image_root, tmp_path / "fused", *common, "--fused_backward_pass")
    plain, fused = load_file(tmp_path / "plain" / "out.safetensors"), load_file(tmp_path / "fused" / "out.safetensors")
    assert plain.keys() == fused.keys()
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-6)
    assert stepped  # the hooks stepped: an ignored flag would match the plain run too
