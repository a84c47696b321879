"""FLUX LoRA: BFL module names, fused modules (one LoRA over diffusers' q/k/v/MLP-in), the family
--network_args, and the PEFT/diffusers file layout applied exactly by diffusers' FluxPipeline.

Exactness of every transformer module, single blocks' `linear1` included, is checked by our own
fused-weight math: merging the file into a BFL state dict with W += alpha/rank * up @ down (as
ComfyUI and sd-scripts do) and converting back must give the same outputs as the trained hooks.
"""

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.families.base import ModelComponents
from library.families.flux import FluxFamily, FluxLoraSettings, FluxSettings
from library.models import flux_checkpoint as ckpt
from library.tiny_models.sd import tiny_clip_text_model
from library.tiny_models.flux import tiny_flux_transformer, tiny_t5_encoder
from networks.lora import create_network

DOUBLE_NAMES = {f"lora_unet_double_blocks_0_{part}" for part in (
    "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
    "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")}
SINGLE_NAMES = {f"lora_unet_single_blocks_0_{part}" for part in ("linear1", "linear2", "modulation_lin")}


def components():
    return ModelComponents(denoiser=tiny_flux_transformer(), vae=None,
                           text_encoders=[tiny_clip_text_model(), tiny_t5_encoder()], tokenizers=[None, None],
                           noise_scheduler=None)


def network(parts, network_args=None, dim=4, save_format="kohya", train_text_encoder=True):
    family = FluxFamily(FluxSettings(lora=FluxLoraSettings(network_args or {}), save_lora_format=save_format))
    net = create_network(family.lora_targets(parts), network_dim=dim, network_alpha=2,
                         train_text_encoder=train_text_encoder)
    torch.manual_seed(1)
    for module in net.modules_by_name.values():
        torch.nn.init.normal_(module.lora_up.weight, std=0.05)  # a trained-looking, non-zero update
    return net


def transformer_inputs():
    torch.manual_seed(2)
    return dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
                pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.4]), img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)


def test_module_names_and_shapes():
    net = network(components())
    names = set(net.modules_by_name)
    assert {n for n in names if "_blocks_0_" in n} == DOUBLE_NAMES | SINGLE_NAMES
    assert len([n for n in names if n.startswith("lora_unet_")]) == 2 * 10 + 2 * 3
    assert "lora_te1_text_model_encoder_layers_1_self_attn_q_proj" in names
    assert not any(n.startswith("lora_te3_") for n in names)
    state = net.state_dict()
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * 32, 4)
    assert state["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * 32 + 128, 4)
    assert state["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape == (4, 32)


def test_hooks_equal_the_bfl_merge_of_the_file(tmp_path):
    """Trained hooks == merging the kohya file into BFL weights (linear1 and qkv fused rows included)."""
    parts = components()
    reference = tiny_flux_transformer()
    net = network(parts)
    net.apply_to()
    net.save_weights(str(tmp_path / "lora.safetensors"), None, {})
    with torch.no_grad():
        hooked = parts.denoiser(**transformer_inputs())[0]
    tensors = load_file(str(tmp_path / "lora.safetensors"))
    bfl = ckpt.diffusers_to_bfl(reference.state_dict())
    by_kohya_name = {"lora_unet_" + key[: -len(".weight")].replace(".", "_"): key for key in bfl if key.endswith(".weight")}
    merged = 0
    for name in {key.split(".")[0] for key in tensors if key.startswith("lora_unet_")}:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        key = by_kohya_name[name]
        bfl[key] = bfl[key] + tensors[f"{name}.alpha"] / down.shape[0] * up @ down
        merged += 1
    assert merged == 26
    merged_model = tiny_flux_transformer()
    merged_model.load_state_dict(ckpt.bfl_to_diffusers(bfl))
    with torch.no_grad():
        expected = merged_model(**transformer_inputs())[0]
    assert not torch.allclose(expected, reference(**transformer_inputs())[0])
    torch.testing.assert_close(hooked, expected, rtol=0, atol=2e-5)


def test_family_network_args_select_blocks_and_ranks():
    parts = components()
    net = network(parts, {"train_blocks": "single"})
    assert all("single_blocks" in n for n in net.modules_by_name if n.startswith("lora_unet_"))
    net = network(parts, {"img_attn_dim": "8", "single_dim": "0", "train_double_block_indices": "1",
                          "train_t5xxl": "True"})
    names = net.modules_by_name
    assert not any(n.startswith("lora_unet_double_blocks_0_") for n in names)
    assert names["lora_unet_double_blocks_1_img_attn_qkv"].rank == 8
    assert names["lora_unet_double_blocks_1_txt_attn_qkv"].rank == 4
    assert not any("linear1" in n or "linear2" in n for n in names)
    assert names["lora_unet_single_blocks_0_modulation_lin"].rank == 4
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in names
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in names
    assert '"img_attn_dim": "8"' in net.metadata()["ss_network_args"]
    with pytest.raises(UserError, match="block 5 does not exist"):
        network(parts, {"train_single_block_indices": "0,5"})
    with pytest.raises(UserError, match="train_blocks=some: use all, single or double"):
        FluxLoraSettings({"train_blocks": "some"})


def test_network_args_are_split_from_networks_lora_keys():
    from library.config.arguments import parse_training_args
    from library.families import get_family

    from networks.network_arguments import create_network_kwargs

    argv_network_args = ["train_blocks=double", "conv_dim=4", "train_t5xxl=False"]
    family, args = parse_training_args(get_family("flux"), "network", [
        "--pretrained_model_name_or_path", "x.safetensors", "--output_dir", "out", "--train_data_dir", "img",
        "--network_args", *argv_network_args])
    assert args.network_args == argv_network_args  # the user's arguments are never rewritten
    assert create_network_kwargs(args, family.network_arg_keys)["network_args"] == {"conv_dim": "4"}
    assert family.settings.lora.given == {"train_blocks": "double", "train_t5xxl": "False"}
    assert family.settings.lora.train_blocks == "double"


def test_diffusers_layout_is_applied_exactly_by_flux_pipeline(tmp_path):
    from diffusers import FluxPipeline

    from library.tiny_models.flux import save_tiny_flux_pipeline

    folder = save_tiny_flux_pipeline(str(tmp_path / "model"))
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    parts = ModelComponents(denoiser=pipe.transformer, vae=None, text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
                            tokenizers=[None, None], noise_scheduler=None)
    net = network(parts, save_format="diffusers")
    net.save_weights(str(tmp_path / "peft.safetensors"), None, {})
    tensors = load_file(str(tmp_path / "peft.safetensors"))
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in tensors
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight" in tensors
    roots = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    expected = {}
    for name, module in net.modules_by_name.items():
        deltas = module.member_delta_weights() if hasattr(module, "member_delta_weights") else [module.delta_weight()]
        paths = net.diffusers_paths[name]
        assert all(f"{path}.lora_A.weight" in tensors for path in paths)
        for path, delta in zip(paths, deltas):
            root, _, layer = path.partition(".")
            weight = roots[root].get_submodule(layer).weight
            expected[path] = (weight, weight.detach() + delta)
    assert len(expected) == len(tensors) // 2 == 2 * 14 + 2 * 6 + 12
    pipe.load_lora_weights(str(tmp_path / "peft.safetensors"))
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    for path, (_, weight) in expected.items():
        root, _, layer = path.partition(".")
        torch.testing.assert_close(roots[root].get_submodule(layer).weight.detach(), weight, rtol=0, atol=1e-6)


def test_fused_module_shares_one_down_projection_and_its_dropouts():
    from networks.lora_fused import FusedLoRAModule

    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 16)]
    module = FusedLoRAModule("fused", layers, rank=4, alpha=4, rank_dropout=0.5)
    torch.nn.init.normal_(module.lora_up.weight)
    module.attach()
    module.train()
    calls = []
    original = module.down_projection
    module.down_projection = lambda x: calls.append(1) or original(x)
    x = torch.randn(2, 5, 8)
    outputs = [layer(x) for layer in reversed(layers)]  # any member may come first
    assert len(calls) == 1  # one down projection (one rank-dropout mask) for all members
    deltas = [out - torch.nn.functional.linear(x, layer.weight, layer.bias) for out, layer in zip(outputs, reversed(layers))]
    rows = torch.cat(list(reversed(deltas)), dim=-1)  # member order: 8 + 8 + 16 rows
    # the members' updates come from one hidden vector per token: all 32 rows = up @ h for a single h of rank 4
    solution = torch.linalg.lstsq(module.lora_up.weight.detach(), rows.detach().reshape(-1, 32).T).solution
    torch.testing.assert_close(module.lora_up.weight.detach() @ solution, rows.detach().reshape(-1, 32).T,
                               rtol=0, atol=1e-4)
    module.module_dropout, module.rank_dropout = 0.999999, None
    assert all(torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)) for layer in layers)
