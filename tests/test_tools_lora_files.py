"""tools/convert_lora.py and tools/show_metadata.py: exact round trips between layouts, the diffusers
layout applied exactly by diffusers' own loader, ComfyUI names, and the printed summary."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_script
from library.errors import UserError
from lora_checks import expected_delta, sd15_layers_by_kohya_name
from tools.convert_lora import convert_lora
from tools.show_metadata import show_metadata
from tools_fixtures import write_random_lora


@pytest.fixture(scope="module")
def base_pipe(tiny_sd15_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, local_files_only=True)


@pytest.fixture(scope="module")
def kohya_lora(base_pipe, tmp_path_factory):
    """Linear and 3x3-conv modules with different ranks and alphas, saved in bf16 like --save_precision bf16."""
    path = tmp_path_factory.mktemp("lora") / "kohya.safetensors"
    return write_random_lora(base_pipe, path, seed=3, dim=4, alpha=2, conv_dim=2, dtype=torch.bfloat16)


def assert_same_file_contents(first, second):
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_kohya_diffusers_kohya_round_trip_is_exact(kohya_lora, tmp_path):
    diffusers_file, back = str(tmp_path / "diffusers.safetensors"), str(tmp_path / "back.safetensors")
    convert_lora([kohya_lora, diffusers_file, "--to", "diffusers"])
    convert_lora([diffusers_file, back, "--to", "kohya"])
    assert_same_file_contents(kohya_lora, back)
    keys = load_file(diffusers_file).keys()
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in keys
    assert not any(key.endswith(".alpha") or "lora_down" in key for key in keys)
    with safe_open(back, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and "lora_adapter_metadata" not in metadata
    assert len(metadata["sshs_model_hash"]) == 64  # kohya files get fresh sd-scripts hashes


def test_comfy_layout_uses_checkpoint_names_and_round_trips(kohya_lora, tmp_path):
    comfy, back = str(tmp_path / "comfy.safetensors"), str(tmp_path / "back.safetensors")
    convert_lora([kohya_lora, comfy, "--to", "comfy", "--family", "sd"])
    keys = load_file(comfy).keys()
    # ComfyUI's generic names: the LDM checkpoint path of each layer (comfy/lora.py model_lora_keys_unet)
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in keys
    assert "diffusion_model.input_blocks.1.0.in_layers.2.lora_up.weight" in keys  # resnet conv1
    assert "diffusion_model.output_blocks.2.1.conv.alpha" in keys  # the first upsampler
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight" in keys
    convert_lora([comfy, back, "--to", "kohya"])
    assert_same_file_contents(kohya_lora, back)


def test_diffusers_layout_applies_every_module_exactly(base_pipe, kohya_lora, tmp_path):
    """diffusers' load_lora_weights reads ranks and alphas from the metadata: fused = W + alpha/r up@down."""
    from diffusers import StableDiffusionPipeline

    diffusers_file = str(tmp_path / "diffusers.safetensors")
    convert_lora([kohya_lora, diffusers_file, "--to", "diffusers"])
    pipe = StableDiffusionPipeline(**base_pipe.components)
    layers = sd15_layers_by_kohya_name(pipe)
    kohya = load_file(kohya_lora)
    names = sorted({key.split(".")[0] for key in kohya})
    before = {name: getattr(pipe, layers[name][0]).get_submodule(layers[name][1]).weight.detach().clone()
              for name in names}
    pipe.load_lora_weights(diffusers_file)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    try:
        for name in names:
            root, path = layers[name]
            down, up = kohya[f"{name}.lora_down.weight"].float(), kohya[f"{name}.lora_up.weight"].float()
            scale = kohya[f"{name}.alpha"].float().item() / down.shape[0]
            fused = getattr(pipe, root).get_submodule(path).weight.detach()
            torch.testing.assert_close(fused, before[name] + expected_delta(down, up, scale), atol=1e-5, rtol=0)
    finally:  # the fixture's modules are shared: put the original weights back
        for name in names:
            getattr(pipe, layers[name][0]).get_submodule(layers[name][1]).weight.data.copy_(before[name])
    assert len(names) == 289


def test_convert_errors(kohya_lora, tmp_path):
    with pytest.raises(UserError, match="is the input file"):
        convert_lora([kohya_lora, kohya_lora, "--to", "comfy"])
    with pytest.raises(UserError, match="does not exist"):
        convert_lora([str(tmp_path / "none.safetensors"), str(tmp_path / "x.safetensors"), "--to", "comfy"])
    foreign = str(tmp_path / "flux.safetensors")
    from library.lora_formats import write_lora

    write_lora(foreign, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
                         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 2)}, {}, "kohya")
    with pytest.raises(UserError, match=r"1 of 1 modules .* not layers of a Stable Diffusion.*looks like a FLUX.1 LoRA"):
        convert_lora([foreign, str(tmp_path / "x.safetensors"), "--to", "diffusers", "--family", "sd"])


def test_show_metadata_summarises_a_lora(kohya_lora, tmp_path, capsys):
    diffusers_file = str(tmp_path / "diffusers.safetensors")
    convert_lora([kohya_lora, diffusers_file, "--to", "diffusers"])
    show_metadata([diffusers_file])
    out = capsys.readouterr().out
    assert "LoRA: Stable Diffusion 1.x/2.x family, diffusers layout, 289 modules (50 on 3x3 convolutions)" in out
    assert "rank: 2 (50 modules), 4 (239 modules)" in out and "alpha: 1 (50 modules), 2 (239 modules)" in out
    assert "parts: text_encoder 12, unet 277" in out and "tensor dtypes: BF16 578" in out
    assert out.index("ss_network_dim: 4") < out.index("lora_adapter_metadata:")  # ss_* first
    assert '        "conv_dim": "2",' in out  # JSON values pretty-printed
    assert "more (--full shows all)" in out
    show_metadata([diffusers_file, "--full"])
    assert "more (--full shows all)" not in capsys.readouterr().out


def test_command_lines(kohya_lora, tmp_path):
    """One run per tool (convert_lora's success path imports diffusers; tested in-process above)."""
    comfy = str(tmp_path / "comfy.safetensors")
    result = run_script("tools/convert_lora.py", kohya_lora, kohya_lora, "--to", "comfy")
    assert result.returncode == 2 and "is the input file; choose another output path" in result.stderr
    convert_lora([kohya_lora, comfy, "--to", "comfy"])
    result = run_script("tools/show_metadata.py", comfy)
    assert result.returncode == 0, result.stderr
    assert "LoRA: Stable Diffusion 1.x/2.x family, comfy layout, 289 modules" in result.stdout
    assert "parts: diffusion_model 277, text_encoder 12" in result.stdout
    with pytest.raises(UserError, match="missing.safetensors: file not found"):
        show_metadata([str(tmp_path / "missing.safetensors")])
    assert json.loads(load_file_metadata(comfy)["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}


def load_file_metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata()
