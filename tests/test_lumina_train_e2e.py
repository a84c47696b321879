"""End to end: lumina_train_network.py / lumina_train.py on a tiny Lumina Image 2.0, from a diffusers folder
and from original single files, with cached latents and cached Gemma-2 outputs.

The diffusers-layout LoRA is checked in diffusers' Lumina2Pipeline (a loader we did not write): every
module is applied exactly (fused weight == W + alpha/rank * up @ down, and it changed). The kohya file
converts to the diffusers layout and back bit-exactly (library/lora_formats.py).
"""

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_script
from library.cli import run_training

KOHYA_KEY = re.compile(
    r"lora_(unet_(layers_\d+|noise_refiner_\d+|context_refiner_\d+)_(attention_qkv|attention_out|feed_forward_w[123]"
    r"|adaLN_modulation_1)|te_layers_\d+_(self_attn_(q|k|v|o)_proj|mlp_(gate|up|down)_proj))"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)"
)
# 2 layers + 1 noise refiner x 6 modules, 1 context refiner x 5 (no modulation)
TRANSFORMER_MODULES = 3 * 6 + 5


@pytest.fixture(scope="module")
def tiny_lumina(tmp_path_factory):
    from library.tiny_models.lumina import save_tiny_lumina_pipeline, save_tiny_lumina_single_files

    root = tmp_path_factory.mktemp("tiny_lumina")
    return save_tiny_lumina_pipeline(str(root / "folder")), save_tiny_lumina_single_files(str(root / "files"))


def single_file_args(files):
    return ["--pretrained_model_name_or_path", files["transformer"], "--gemma2", files["gemma2"], "--ae", files["ae"],
            "--gemma2_tokenizer", files["gemma2_tokenizer"]]


def train(mode, model_args, images, output_dir, *extra, cache_text=True):
    lora = ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2"] if mode == "network" else []
    run_training("lumina", mode, [
        *model_args, "--train_data_dir", images, "--resolution", "64", "--output_dir", str(output_dir),
        "--output_name", "out", "--seed", "7", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--gemma2_max_token_length", "48", "--cache_latents_to_disk",
        *(["--cache_text_encoder_outputs_to_disk"] if cache_text else []), *lora, *extra,
    ])


def test_diffusers_layout_lora_applies_exactly_in_lumina2_pipeline(tiny_lumina, demo_image_root, tmp_path):
    from diffusers import Lumina2Pipeline

    folder, _ = tiny_lumina
    train("network", ["--pretrained_model_name_or_path", folder], demo_image_root, tmp_path / "out",
          "--max_train_steps", "3", "--network_train_unet_only", "--save_lora_format", "diffusers")
    path = str(tmp_path / "out" / "out.safetensors")
    tensors = load_file(path)
    assert len(tensors) == 2 * (TRANSFORMER_MODULES + 2 * 4)  # qkv -> to_q, to_k, to_v
    assert tensors["transformer.layers.0.attn.to_k.lora_B.weight"].shape == (32, 4)
    assert all(k.startswith("transformer.") for k in tensors)
    pipe = Lumina2Pipeline.from_pretrained(folder, local_files_only=True)
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    before = {p: pipe.transformer.get_submodule(p.removeprefix("transformer.")).weight.detach().clone() for p in paths}
    pipe.load_lora_weights(path)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    for p in paths:
        delta = tensors[f"{p}.lora_B.weight"] @ tensors[f"{p}.lora_A.weight"]  # alpha/rank folded into lora_B
        after = pipe.transformer.get_submodule(p.removeprefix("transformer.")).weight.detach()
        assert delta.abs().sum() > 0
        torch.testing.assert_close(after, before[p] + delta, rtol=0, atol=1e-6)


def test_single_files_kohya_names_and_lossless_conversion(tiny_lumina, demo_image_root, tmp_path):
    from library.families import get_family
    from library.lora_formats import convert_lora_file

    _, files = tiny_lumina
    train("network", single_file_args(files), demo_image_root, tmp_path / "out", "--max_train_steps", "2",
          "--system_prompt", "", cache_text=False)
    path = tmp_path / "out" / "out.safetensors"
    tensors = load_file(path)
    assert all(KOHYA_KEY.fullmatch(key) for key in tensors), [k for k in tensors if not KOHYA_KEY.fullmatch(k)][:3]
    unet = {k.split(".")[0] for k in tensors if k.startswith("lora_unet_")}
    te = {k.split(".")[0] for k in tensors if k.startswith("lora_te_")}
    assert len(unet) == TRANSFORMER_MODULES and len(te) == 2 * 7
    assert tensors["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (64 + 2 * 32, 4)
    assert "lora_unet_context_refiner_0_adaLN_modulation_1.alpha" not in tensors
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "lumina2" and metadata["modelspec.architecture"] == "lumina-2/lora"
    # sd-scripts' Lumina defaults, written as its lumina_train_network.py writes them
    assert (metadata["ss_timestep_sampling"], metadata["ss_discrete_flow_shift"], metadata["ss_model_prediction_type"],
            metadata["ss_sigmoid_scale"], metadata["ss_weighting_scheme"]) == ("shift", "6.0", "raw", "1.0", "uniform")
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    from safetensors.torch import save_file

    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    family = get_family("lumina")
    convert_lora_file(str(tmp_path / "unet.safetensors"), str(tmp_path / "peft.safetensors"), "diffusers", family)
    peft = load_file(tmp_path / "peft.safetensors")
    assert "transformer.noise_refiner.0.attn.to_v.lora_A.weight" in peft and len(peft) == 2 * (TRANSFORMER_MODULES + 2 * 4)
    convert_lora_file(str(tmp_path / "peft.safetensors"), str(tmp_path / "back.safetensors"), "kohya", family)
    back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == unet_only.keys()
    assert all(torch.equal(back[k], unet_only[k]) and back[k].dtype == unet_only[k].dtype for k in back)


def test_full_fine_tune_writes_an_original_single_file(tiny_lumina, demo_image_root, tmp_path):
    from library.models.lumina_checkpoint import load_lumina_transformer
    from library.tiny_models.lumina import tiny_lumina_transformer

    _, files = tiny_lumina
    train("full", single_file_args(files), demo_image_root, tmp_path / "out", "--max_train_steps", "2",
          "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
          "warmup_init=False", "--gradient_checkpointing", "--save_model_as", "safetensors")
    path = str(tmp_path / "out" / "out.safetensors")
    keys = set(load_file(path))
    assert "layers.1.attention.qkv.weight" in keys and "norm_final.weight" in keys and "cap_embedder.1.weight" in keys
    trained, original = load_lumina_transformer(path).state_dict(), tiny_lumina_transformer().state_dict()
    assert trained.keys() == original.keys()
    assert not torch.equal(trained["layers.0.attn.to_q.weight"], original["layers.0.attn.to_q.weight"])


def test_full_fine_tune_saved_as_diffusers_loads_in_lumina2_pipeline(tiny_lumina, demo_image_root, tmp_path):
    """--save_model_as diffusers: a whole Lumina2Pipeline folder whose transformer is the trained one
    (the same run saved as the original single file holds the same weights)."""
    from diffusers import Lumina2Pipeline

    from library.models.lumina_checkpoint import load_lumina_transformer

    _, files = tiny_lumina
    common = ["--max_train_steps", "2", "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
              "scale_parameter=False", "warmup_init=False"]
    train("full", single_file_args(files), demo_image_root, tmp_path / "st", *common)
    train("full", single_file_args(files), demo_image_root, tmp_path / "df", *common, "--save_model_as", "diffusers")
    pipe = Lumina2Pipeline.from_pretrained(str(tmp_path / "df" / "out"), local_files_only=True)
    trained = load_lumina_transformer(str(tmp_path / "st" / "out.safetensors")).state_dict()
    folder = pipe.transformer.state_dict()
    assert folder.keys() == trained.keys() and all(torch.equal(folder[k], trained[k]) for k in folder)
    assert pipe.text_encoder is not None and pipe.vae is not None and pipe.tokenizer is not None


def test_script_rejects_flags_without_effect(tiny_lumina, tmp_path):
    folder, _ = tiny_lumina
    result = run_script("lumina_train_network.py", "--pretrained_model_name_or_path", folder, "--output_dir",
                        str(tmp_path), "--train_data_dir", str(tmp_path), "--save_lora_format", "diffusers",
                        "--network_module", "networks.lora")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--save_lora_format diffusers cannot hold Gemma-2 LoRA modules" in result.stderr


@pytest.mark.parametrize("flag", ["--fused_backward_pass", "--blockwise_fused_optimizers"])
def test_fused_optimizer_steps_train_the_same_weights(tiny_lumina, demo_image_root, tmp_path, flag, monkeypatch):
    """The optimizer stepped inside backward (per parameter, or per transformer layer) == the plain step."""
    from library.training import fused_backward

    stepped, step_only = [], fused_backward.step_only
    monkeypatch.setattr(fused_backward, "step_only", lambda *a: stepped.append(1) or step_only(*a))
    _, files = tiny_lumina
    common = ["--max_train_steps", "2", "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
              "scale_parameter=False", "--max_grad_norm", "0", "--gradient_checkpointing"]
    train("full", single_file_args(files), demo_image_root, tmp_path / "plain", *common)
    train("full", single_file_args(files), demo_image_root, tmp_path / "fused", *common, flag)
    plain, fused = load_file(tmp_path / "plain" / "out.safetensors"), load_file(tmp_path / "fused" / "out.safetensors")
    assert plain.keys() == fused.keys()
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-6)
    assert stepped  # the hooks stepped: an ignored flag would match the plain run too
