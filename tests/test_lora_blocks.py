"""Per-block LoRA ranks, alphas and learning rates (networks/lora_blocks.py, SD3's per-part keys).

The block of each module is worked out here from sd-scripts' published numbering (SD 1.x: IN01-IN11
by three slots per level, MID 12, OUT 13-24; SDXL: LDM input_blocks.N = 1 + N, middle_block 10-12,
output_blocks.N = 13 + N), not taken from library/, and every file is read back and loaded by diffusers.
"""

import math
import re

import pytest
import torch
from safetensors.torch import load_file

from library.cli import run_training
from library.errors import UserError
from library.families.base import LoraTarget
from library.families.sd_lora_names import SD_UNET_BLOCKS
from library.tiny_models.sd import tiny_sd15_pipeline
from lora_checks import assert_diffusers_applies_every_module, sdxl_layers_by_kohya_name
from networks.lora import create_network


def sd_block(name: str):
    match = re.match(r"lora_unet_(down|up)_blocks_(\d)_(resnets|attentions|downsamplers|upsamplers)_(\d)_", name)
    if match:
        side, level, kind, index = match.groups()
        slot = 3 * int(level) + (2 if "samplers" in kind else int(index))
        return (1 if side == "down" else 13) + slot
    return 12 if "mid_block" in name else None


def sdxl_block(name: str):
    match = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", name)
    return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[match.group(1)] + int(match.group(2))


def modules_of(path):
    tensors = load_file(path)
    names = sorted({key.split(".")[0] for key in tensors})
    return {n: (tensors[f"{n}.lora_down.weight"].shape[0], tensors[f"{n}.alpha"].item()) for n in names}


def is_conv3x3(tensors, name):
    down = tensors[f"{name}.lora_down.weight"]
    return down.dim() == 4 and down.shape[-1] == 3


def test_sd_block_ranks_alphas_and_zero_lr_blocks_in_the_saved_file(tiny_sd15_folder, demo_image_root, tmp_path):
    from diffusers import StableDiffusionPipeline

    dims = [(i % 4) + 1 for i in range(25)]
    dims[5] = 0  # IN05: no linear modules
    alphas = [2.0] * 25  # one alpha: diffusers' SD 1.x kohya loader applies a per-module alpha pattern wrongly
    conv_dims = [2] * 25
    up = [1.0] * 12
    up[3] = 0.0  # OUT03 learns nothing: no module at all
    run_training("sd", "network", [
        "--pretrained_model_name_or_path", tiny_sd15_folder, "--train_data_dir", demo_image_root,
        "--resolution", "64", "--output_dir", str(tmp_path), "--output_name", "out", "--seed", "7",
        "--train_batch_size", "2", "--learning_rate", "1e-3", "--max_train_steps", "2",
        "--network_module", "networks.lora", "--network_train_unet_only", "--network_args",
        "block_dims=" + ",".join(map(str, dims)), "block_alphas=" + ",".join(map(str, alphas)),
        "conv_block_dims=" + ",".join(map(str, conv_dims)), "conv_block_alphas=" + ",".join(["0.5"] * 25),
        "up_lr_weight=" + ",".join(map(str, up)), "mid_lr_weight=0.05", "block_lr_zero_threshold=0.1",
    ])
    path = tmp_path / "out.safetensors"
    modules, tensors = modules_of(path), load_file(path)
    blocks = {sd_block(n) for n in modules}
    assert None not in blocks and 12 not in blocks and 16 not in blocks  # MID below threshold, OUT03 zero
    assert {1, 2, 5, 13, 24} <= blocks
    assert any(is_conv3x3(tensors, name) for name in modules)  # conv_block_dims put LoRA on the 3x3 convolutions
    for name, (rank, alpha) in modules.items():
        block = sd_block(name)
        if is_conv3x3(tensors, name):
            assert (rank, alpha) == (2, 0.5), name
        else:
            assert block != 5 and (rank, alpha) == (dims[block], alphas[block]), name
    checked = assert_diffusers_applies_every_module(
        lambda: StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, local_files_only=True), str(path))
    assert checked == len(modules)


def test_lr_weights_land_in_optimizer_groups():
    pipe = tiny_sd15_pipeline()
    targets = [LoraTarget("lora_unet", pipe.unet, ("Transformer2DModel",), block_layout=SD_UNET_BLOCKS),
               LoraTarget("lora_te", pipe.text_encoder, ("CLIPAttention", "CLIPMLP"), is_text_encoder=True)]
    network = create_network(targets, network_dim=4, network_alpha=1, network_args={
        "down_lr_weight": "sine+0.25", "mid_lr_weight": "2", "up_lr_weight": "cosine", "loraplus_lr_ratio": "4"})
    groups = network.prepare_optimizer_params(None, 1e-5, 1e-3)
    by_name = {g["name"]: g for g in groups}
    sine = [math.sin(math.pi / 2 * i / 11) + 0.25 for i in range(12)]  # sd-scripts' "sine" over IN00-IN11
    cosine = [math.sin(math.pi / 2 * i / 11) for i in reversed(range(12))]
    for block in (1, 2, 4, 5, 7, 8):  # the SD tiny UNet's attention blocks
        assert by_name[f"unet_block{block}"]["lr"] == pytest.approx(1e-3 * sine[block])
        assert by_name[f"unet_block{block} lora_up"]["lr"] == pytest.approx(4e-3 * sine[block])
    assert by_name["unet_block12"]["lr"] == pytest.approx(2e-3)
    assert "unet_block24" not in by_name and "unet_block23" in by_name  # cosine ends at 0: OUT11 gets no module
    assert by_name["unet_block23"]["lr"] == pytest.approx(1e-3 * cosine[10])
    assert by_name["text_encoder"]["lr"] == 1e-5
    names = {m.lora_name for m in network.unet_modules}
    assert not any(sd_block(n) == 24 for n in names)
    params = {id(p) for g in groups for p in g["params"]}
    assert params == {id(p) for p in network.parameters()}  # every parameter in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_block_args_errors():
    pipe = tiny_sd15_pipeline()
    unet = [LoraTarget("lora_unet", pipe.unet, ("Transformer2DModel",), block_layout=SD_UNET_BLOCKS)]
    with pytest.raises(UserError, match="3 values given, this model has 25 blocks"):
        create_network(unet, network_dim=4, network_alpha=1, network_args={"block_dims": "1,2,3"})
    with pytest.raises(UserError, match="block_lr_zero_threshold needs"):
        create_network(unet, network_dim=4, network_alpha=1, network_args={"block_lr_zero_threshold": "0.1"})
    with pytest.raises(UserError, match="no trained UNet with numbered blocks"):
        create_network([LoraTarget("lora_unet", pipe.unet, ("Transformer2DModel",))], network_dim=4,
                       network_alpha=1, network_args={"block_dims": ",".join(["1"] * 25)})
    with pytest.raises(UserError, match="preset"):
        create_network(unet, network_dim=4, network_alpha=1, network_args={"down_lr_weight": "wavy"})
    with pytest.raises(UserError, match="13 values"):
        create_network(unet, network_dim=4, network_alpha=1, network_args={"up_lr_weight": ",".join(["1"] * 13)})
    with pytest.raises(UserError, match="conv_block_alphas needs conv_block_dims"):
        create_network(unet, network_dim=4, network_alpha=1, network_args={"conv_block_alphas": "1"})


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from library.tiny_models.sdxl import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("tiny_sdxl")))


def test_sdxl_block_ranks_in_the_saved_file(sdxl_folder, demo_image_root, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    dims = [0] + [3] * 9 + [0, 5, 0] + [2] * 9 + [0]  # 23 blocks; MID00 and MID02 (resnets) off
    down = [1.0] * 9
    down[4] = 0  # IN05 learns nothing
    run_training("sdxl", "network", [
        "--pretrained_model_name_or_path", sdxl_folder, "--train_data_dir", demo_image_root,
        "--resolution", "64", "--output_dir", str(tmp_path), "--output_name", "out", "--seed", "7",
        "--train_batch_size", "2", "--learning_rate", "1e-3", "--max_train_steps", "2",
        "--network_module", "networks.lora", "--network_train_unet_only", "--network_alpha", "1",
        "--network_args", "block_dims=" + ",".join(map(str, dims)), "down_lr_weight=" + ",".join(map(str, down)),
    ])
    path = tmp_path / "out.safetensors"
    modules = modules_of(path)
    blocks = {sdxl_block(n) for n in modules}
    assert 5 not in blocks and 10 not in blocks and {6, 8, 9, 11, 13, 18} <= blocks  # the tiny UNet's attentions
    assert all(rank == dims[sdxl_block(n)] and alpha == 1.0 for n, (rank, alpha) in modules.items())
    checked = assert_diffusers_applies_every_module(
        lambda: StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True), str(path),
        sdxl_layers_by_kohya_name)
    assert checked == len(modules)


def test_sd3_part_ranks_and_block_indices(demo_image_root, tmp_path):
    from library.tiny_models.sd3 import save_tiny_sd3_pipeline
    from test_sd3_train_e2e import assert_diffusers_applies

    folder = save_tiny_sd3_pipeline(str(tmp_path / "sd35"), dual_attention=True)
    run_training("sd3", "network", [
        "--pretrained_model_name_or_path", folder, "--train_data_dir", demo_image_root, "--resolution", "64",
        "--output_dir", str(tmp_path / "out"), "--output_name", "out", "--seed", "7", "--train_batch_size", "2",
        "--learning_rate", "1e-3", "--t5xxl_max_token_length", "16", "--max_train_steps", "2",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2",
        "--network_train_unet_only", "--save_lora_format", "diffusers", "--network_args",
        "context_attn_dim=0", "x_mlp_dim=8", "train_block_indices=0",
    ])
    path = str(tmp_path / "out" / "out.safetensors")
    tensors = load_file(path)
    ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    assert all(p.startswith("transformer.transformer_blocks.0.") for p in ranks)  # block 1 left out
    assert not any(".add_" in p or "to_add_out" in p for p in ranks)  # context attention: rank 0
    assert ranks["transformer.transformer_blocks.0.ff.net.0.proj"] == 8
    assert ranks["transformer.transformer_blocks.0.ff.net.2"] == 8
    assert ranks["transformer.transformer_blocks.0.ff_context.net.0.proj"] == 4
    assert ranks["transformer.transformer_blocks.0.attn2.to_q"] == 4
    assert assert_diffusers_applies(folder, path) == len(ranks)


def test_sd3_family_keys_are_validated(demo_image_root, tmp_path, capsys):
    from library.tiny_models.sd3 import save_tiny_sd3_pipeline

    folder = save_tiny_sd3_pipeline(str(tmp_path / "sd35"), dual_attention=True)
    for network_args, message in ((["train_block_indices=5"], "block 5 does not exist"),
                                  (["emb_dims=4,0,0,0,0,0"], "emb_dims"),
                                  (["block_dims=" + ",".join(["1"] * 25)], "no trained UNet with numbered blocks")):
        with pytest.raises(SystemExit):
            run_training("sd3", "network", [
                "--pretrained_model_name_or_path", folder, "--train_data_dir", demo_image_root, "--resolution", "64",
                "--output_dir", str(tmp_path / "out"), "--t5xxl_max_token_length", "16", "--max_train_steps", "1",
                "--network_module", "networks.lora", "--network_train_unet_only", "--network_args", *network_args])
        assert message in capsys.readouterr().err


def test_network_weights_with_other_block_ranks_names_the_block_key(tmp_path):
    pipe = tiny_sd15_pipeline()
    unet = [LoraTarget("lora_unet", pipe.unet, ("Transformer2DModel",), block_layout=SD_UNET_BLOCKS)]
    saved = create_network(unet, network_dim=4, network_alpha=1, network_args={"block_dims": ",".join(["2"] * 25)})
    saved.save_weights(str(tmp_path / "blocks.safetensors"), None, {})
    again = create_network(unet, network_dim=4, network_alpha=1, network_args={"block_dims": ",".join(["2"] * 25)})
    assert again.load_weights(str(tmp_path / "blocks.safetensors")) == len(saved.modules_by_name)
    other = create_network(unet, network_dim=4, network_alpha=1, network_args={"block_dims": ",".join(["3"] * 25)})
    with pytest.raises(UserError, match="rank 2 but --network_args block_dims is 3"):
        other.load_weights(str(tmp_path / "blocks.safetensors"))
