"""LoRA network (networks/lora*.py, networks/network_arguments.py) on a tiny SD 1.5 pipeline.

The key check loads our kohya file with diffusers' own `load_lora_weights` (a client we did not
write), fuses it and compares every targeted layer with W + alpha/rank * up @ down.
"""

import argparse
import hashlib
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.families.base import LoraTarget
from library.tiny_models.sd import tiny_sd15_pipeline
from lora_checks import expected_delta
from networks import network_arguments
from networks.lora import create_network
from networks.lora_modules import LoRAModule

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 3.0
# 16 Transformer2DModel x 12 layers, 22 resnets x (conv1, conv2, time_emb_proj) + 13 conv_shortcuts,
# 3 downsamplers + 3 upsamplers, 2 CLIP layers x (q, k, v, out, fc1, fc2)
UNET_LINEAR_MODULES, UNET_CONV_EXTRA_MODULES, TE_MODULES = 16 * 12, 22 * 3 + 13 + 6, 2 * 6
ALL_MODULES = UNET_LINEAR_MODULES + UNET_CONV_EXTRA_MODULES + TE_MODULES


def sd15_targets(pipe) -> list[LoraTarget]:
    return [
        LoraTarget("lora_unet", pipe.unet, ("Transformer2DModel",), ("ResnetBlock2D", "Downsample2D", "Upsample2D")),
        LoraTarget("lora_te", pipe.text_encoder, ("CLIPAttention", "CLIPMLP"), file_path_prefix="text_model.",
                   is_text_encoder=True),
    ]


def conv_network(pipe, **kwargs):
    args = {"conv_dim": str(CONV_RANK), "conv_alpha": str(CONV_ALPHA), **kwargs.pop("network_args", {})}
    return create_network(sd15_targets(pipe), network_dim=RANK, network_alpha=ALPHA, network_args=args, **kwargs)


def randomize(network, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules_by_name.values():
            for weight in (module.lora_down.weight, module.lora_up.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def pipe():
    """A pipeline networks are created on but never applied to (creating one changes nothing)."""
    return tiny_sd15_pipeline()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A hooked pipeline with a randomized conv LoRA, and the file it saved."""
    pipe = tiny_sd15_pipeline()
    network = conv_network(pipe)
    randomize(network)
    path = str(tmp_path_factory.mktemp("lora") / "lora.safetensors")
    network.save_weights(path, None, {"ss_training_comment": "test", "modelspec.title": "tiny"})
    return pipe, network, path


@pytest.fixture(scope="module")
def fused_by_diffusers(trained):
    _, _, path = trained
    pipe = tiny_sd15_pipeline()
    originals = {f"{prefix}:{name}": module.weight.detach().clone()
                 for prefix, root in (("unet", pipe.unet), ("te", pipe.text_encoder))
                 for name, module in root.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    pipe.load_lora_weights(path)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, removes the PEFT wrappers
    return pipe, originals


def test_file_has_sd_scripts_sd1_names(trained):
    _, _, path = trained
    tensors = load_file(path)
    names = {key.split(".")[0] for key in tensors}
    assert len(names) == ALL_MODULES and len(tensors) == 3 * ALL_MODULES
    key_pattern = r"lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)"
    assert all(re.fullmatch(key_pattern, key) for key in tensors)
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_down_blocks_0_attentions_0_proj_in",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
                 "lora_unet_down_blocks_0_resnets_0_conv1",
                 "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
                 "lora_unet_down_blocks_2_resnets_0_conv_shortcut",
                 "lora_unet_down_blocks_0_downsamplers_0_conv",
                 "lora_unet_up_blocks_0_upsamplers_0_conv",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        assert name in names, name
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tuple(tensors[f"{conv1}.lora_down.weight"].shape) == (CONV_RANK, 32, 3, 3)
    assert tuple(tensors[f"{conv1}.lora_up.weight"].shape) == (32, CONV_RANK, 1, 1)
    assert tensors[f"{conv1}.alpha"].item() == CONV_ALPHA and tensors[f"{conv1}.alpha"].dim() == 0
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tuple(tensors[f"{proj_in}.lora_down.weight"].shape) == (RANK, 32, 1, 1)
    assert tensors[f"{proj_in}.alpha"].item() == ALPHA
    q_proj = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tuple(tensors[f"{q_proj}.lora_down.weight"].shape) == (RANK, 32)


def test_metadata_and_sshs_hashes(trained, tmp_path):
    _, network, path = trained
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3.0"}
    assert metadata["ss_training_comment"] == "test" and metadata["modelspec.title"] == "tiny"
    raw = open(path, "rb").read()
    header_length = int.from_bytes(raw[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + header_length:]).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # file < 1 MiB
    # user (non ss_) metadata does not change the hashes
    other = str(tmp_path / "other.safetensors")
    network.save_weights(other, None, {"modelspec.title": "another title"})
    with safe_open(other, "pt") as f:
        assert f.metadata()["sshs_model_hash"] == metadata["sshs_model_hash"]


def test_diffusers_applies_every_module_exactly(trained, fused_by_diffusers):
    _, network, path = trained
    pipe, originals = fused_by_diffusers
    tensors = load_file(path)
    names = sorted({key.split(".")[0] for key in tensors})
    layer_paths = {}
    for prefix, root in (("unet", trained[0].unet), ("te", trained[0].text_encoder)):
        for layer_path, layer in root.named_modules():
            layer_paths[id(layer)] = (prefix, layer_path)
    checked = 0
    for name in names:
        prefix, layer_path = layer_paths[id(network.modules_by_name[name].original)]
        root = pipe.unet if prefix == "unet" else pipe.text_encoder
        fused = root.get_submodule(layer_path).weight.detach()
        before = originals[f"{prefix}:{layer_path}"]
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        scale = tensors[f"{name}.alpha"].item() / down.shape[0]
        assert not torch.equal(fused, before), f"diffusers did not apply {name}"
        torch.testing.assert_close(fused, before + expected_delta(down, up, scale), atol=1e-5, rtol=0)
        checked += 1
    assert checked == ALL_MODULES


def test_hooked_forward_equals_fused_weights_and_remove_restores(trained, fused_by_diffusers):
    pipe, network, _ = trained
    fused, _ = fused_by_diffusers
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 8, 32, generator=generator)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70] * 2)
    timesteps = torch.tensor([10, 500])
    weights_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    with torch.no_grad():
        plain_unet = pipe.unet(latents, timesteps, context).sample
        plain_te = pipe.text_encoder(ids).last_hidden_state
        network.apply_to()
        try:
            hooked_unet = pipe.unet(latents, timesteps, context).sample
            hooked_te = pipe.text_encoder(ids).last_hidden_state
        finally:
            network.remove()
        restored_unet = pipe.unet(latents, timesteps, context).sample
        fused_unet = fused.unet(latents, timesteps, context).sample
        fused_te = fused.text_encoder(ids).last_hidden_state

    torch.testing.assert_close(hooked_unet, fused_unet, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hooked_te, fused_te, atol=1e-4, rtol=1e-4)
    assert (hooked_unet - plain_unet).abs().max() > 1e-2
    assert torch.equal(restored_unet, plain_unet)
    assert all(torch.equal(v, weights_before[k]) for k, v in pipe.unet.state_dict().items())
    assert not any(k.startswith("lora") for k in pipe.unet.state_dict())


def test_load_weights_round_trip(pipe, trained):
    _, network, path = trained
    fresh = conv_network(pipe)
    assert fresh.load_weights(path) == ALL_MODULES
    ours, theirs = network.state_dict(), fresh.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fp16_save_and_load_with_inexact_alpha(pipe, tmp_path):
    network = create_network(sd15_targets(pipe), network_dim=2, network_alpha=0.1, train_text_encoder=False)
    randomize(network)
    path = str(tmp_path / "half.safetensors")
    network.save_weights(path, torch.float16, {})
    tensors = load_file(path)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert len(tensors) == 3 * UNET_LINEAR_MODULES
    fresh = create_network(sd15_targets(pipe), network_dim=2, network_alpha=0.1, train_text_encoder=False)
    assert fresh.load_weights(path) == UNET_LINEAR_MODULES
    name = "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v"
    assert torch.equal(fresh.modules_by_name[name].lora_up.weight, tensors[f"{name}.lora_up.weight"].float())


def test_load_weights_rejects_mismatched_files(pipe, trained, tmp_path):
    _, _, path = trained
    without_conv = create_network(sd15_targets(pipe), network_dim=RANK, network_alpha=ALPHA)
    with pytest.raises(UserError, match=f"only {UNET_LINEAR_MODULES + TE_MODULES} of its {ALL_MODULES} LoRA modules"):
        without_conv.load_weights(path)
    with pytest.raises(UserError, match="has rank 4 but --network_dim is 8"):
        create_network(sd15_targets(pipe), network_dim=8, network_alpha=ALPHA,
                       network_args={"conv_dim": "2", "conv_alpha": "3"}).load_weights(path)
    with pytest.raises(UserError, match=r"alpha 3 but --network_args conv_alpha is 1; use --network_args conv_alpha 3"):
        create_network(sd15_targets(pipe), network_dim=RANK, network_alpha=ALPHA,
                       network_args={"conv_dim": "2"}).load_weights(path)
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 4)}, foreign)
    with pytest.raises(UserError, match="only 0 of its 1 LoRA modules"):
        without_conv.load_weights(foreign)
    loha = str(tmp_path / "loha.safetensors")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, loha)
    with pytest.raises(UserError, match="not a plain LoRA file"):
        without_conv.load_weights(loha)
    with pytest.raises(UserError, match="does not exist"):
        without_conv.load_weights(str(tmp_path / "missing.safetensors"))


def test_train_parts_select_modules(pipe):
    unet_only = conv_network(pipe, train_text_encoder=False)
    te_only = create_network(sd15_targets(pipe), network_dim=RANK, network_alpha=ALPHA, train_unet=False)
    assert len(unet_only.modules_by_name) == UNET_LINEAR_MODULES + UNET_CONV_EXTRA_MODULES
    assert not unet_only.text_encoder_modules
    assert len(te_only.modules_by_name) == TE_MODULES
    assert all(name.startswith("lora_te_") for name in te_only.modules_by_name)


def test_loraplus_and_per_part_learning_rates(pipe):
    network = create_network(sd15_targets(pipe), network_dim=RANK, network_alpha=ALPHA,
                             network_args={"loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "4"})
    groups = network.prepare_optimizer_params(1e-4, None, 5e-5)
    summary = [(g["name"], g["lr"], len(g["params"])) for g in groups]
    assert summary == [("unet", 1e-4, UNET_LINEAR_MODULES),
                       ("unet lora_up", pytest.approx(1.6e-3), UNET_LINEAR_MODULES),
                       ("text_encoder", 5e-5, TE_MODULES), ("text_encoder lora_up", 2e-4, TE_MODULES)]
    up_ids = {id(m.lora_up.weight) for m in network.modules_by_name.values()}
    assert {id(p) for p in groups[1]["params"]} | {id(p) for p in groups[3]["params"]} == up_ids
    torch.optim.AdamW(groups)  # a valid optimizer definition

    plain = create_network(sd15_targets(pipe), network_dim=RANK, network_alpha=ALPHA)
    groups = plain.prepare_optimizer_params(None, 0, 1e-4)  # text encoder lr 0: frozen and left out
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("unet", 1e-4, 2 * UNET_LINEAR_MODULES)]
    assert not any(p.requires_grad for m in plain.text_encoder_modules for p in m.parameters())
    assert all(p.requires_grad for m in plain.unet_modules for p in m.parameters())
    with pytest.raises(UserError, match="nothing to train"):
        plain.prepare_optimizer_params(0, 0, 1e-4)


def _identity_lora(**dropouts) -> tuple[torch.nn.Linear, LoRAModule]:
    layer = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.zeros_(layer.weight)
    lora = LoRAModule("lora_test", layer, rank=4, alpha=2.0, **dropouts)
    with torch.no_grad():
        lora.lora_down.weight.copy_(torch.eye(4))
        lora.lora_up.weight.copy_(torch.eye(4))
    lora.attach()
    return layer, lora


def test_dropouts_only_in_training_mode():
    torch.manual_seed(0)
    x = torch.ones(256, 4)
    scale = 2.0 / 4
    for dropouts in ({"dropout": 0.5}, {"rank_dropout": 0.5}, {"module_dropout": 0.5}):
        layer, lora = _identity_lora(**dropouts)
        lora.eval()
        assert torch.equal(layer(x), torch.full((256, 4), scale))
        lora.train()
        out = layer(x)
        if "module_dropout" in dropouts:  # one draw per call: all LoRA or none
            outputs = {round(layer(x)[0, 0].item(), 6) for _ in range(40)}
            assert outputs == {0.0, scale}
        else:  # kept entries are rescaled by 1 / (1 - p)
            assert set(out.unique().tolist()) == {0.0, 2 * scale}
            if "rank_dropout" in dropouts:
                assert out.shape == (256, 4) and 0.3 < (out == 0).float().mean() < 0.7
        lora.detach()
        assert torch.equal(layer(x), torch.zeros(256, 4))


def test_rank_dropout_masks_conv_channels_per_sample():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    lora = LoRAModule("lora_conv", conv, rank=3, alpha=3, rank_dropout=0.5)
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
    hidden = lora.lora_down(torch.randn(8, 3, 6, 6))
    mask = lora._rank_keep_mask(hidden)
    assert mask.shape == (8, 3, 1, 1) and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_multiplier_scales_the_update(pipe):
    layer, lora = _identity_lora()
    lora.multiplier = 0.5
    assert torch.equal(layer(torch.ones(1, 4)), torch.full((1, 4), 0.25))
    assert torch.equal(layer(input=torch.ones(1, 4)), torch.full((1, 4), 0.25))
    network = create_network(sd15_targets(pipe), network_dim=RANK, network_alpha=ALPHA, multiplier=0.7)
    network.set_multiplier(0.25)
    assert {m.multiplier for m in network.modules_by_name.values()} == {0.25}


def test_create_network_rejects_bad_options(pipe):
    targets = sd15_targets(pipe)

    def create(**kwargs):
        return create_network(targets, **{"network_dim": RANK, "network_alpha": ALPHA, **kwargs})

    with pytest.raises(UserError, match="unknown key `conv_dims`.*did you mean `conv_dim`"):
        create(network_args={"conv_dims": "4"})
    with pytest.raises(UserError, match="conv_alpha needs conv_dim"):
        create(network_args={"conv_alpha": "1"})
    with pytest.raises(UserError, match="conv_dim=four: expected an integer"):
        create(network_args={"conv_dim": "four"})
    with pytest.raises(UserError, match="rank_dropout=1.5: must be >= 0 and < 1"):
        create(network_args={"rank_dropout": "1.5"})
    with pytest.raises(UserError, match="no 3x3 convolutions"):
        create(network_args={"conv_dim": "4"}, train_unet=False)
    with pytest.raises(UserError, match="exclude each other"):
        create(train_unet=False, train_text_encoder=False)
    with pytest.raises(UserError, match="--network_dim must be at least 1"):
        create(network_dim=0)
    with pytest.raises(UserError, match="loraplus_text_encoder_lr_ratio has no effect"):
        create(network_args={"loraplus_text_encoder_lr_ratio": "4"}, train_text_encoder=False)
    defaults = create_network(targets, network_dim=None, network_alpha=None, network_args={"conv_dim": "8"})
    conv1 = defaults.modules_by_name["lora_unet_down_blocks_0_resnets_0_conv1"]
    linear = defaults.modules_by_name["lora_unet_down_blocks_0_resnets_0_time_emb_proj"]
    assert (conv1.rank, conv1.alpha.item(), linear.rank, linear.alpha.item()) == (8, 1.0, 4, 1.0)


def _parse(argv):
    parser = argparse.ArgumentParser()
    network_arguments.add_network_arguments(parser)
    return parser.parse_args(argv)


def test_network_flags_and_validation(tmp_path):
    args = _parse([])
    defaults = (args.network_module, args.network_dim, args.network_alpha, args.network_args, args.network_weights)
    assert defaults == ("networks.lora", None, 1.0, None, None)
    args = _parse(["--network_dim", "16", "--network_args", "conv_dim=4", "conv_alpha = 2",
                   "--network_train_unet_only"])
    network_arguments.validate_network_args(args)
    assert network_arguments.create_network_kwargs(args) == {
        "network_dim": 16, "network_alpha": 1.0, "network_dropout": None,
        "network_args": {"conv_dim": "4", "conv_alpha": "2"}, "train_unet": True, "train_text_encoder": False}
    assert network_arguments.parse_network_args(["block_lr=a=b"]) == {"block_lr": "a=b"}
    for bad, message in ((["conv_dim"], "not of the form key=value"), (["=4"], "not of the form"),
                         (["conv_dim=4", "conv_dim=8"], "gives `conv_dim` twice")):
        with pytest.raises(UserError, match=message):
            network_arguments.parse_network_args(bad)
    for argv, message in (
        (["--network_args", "conv_dims=4"], "did you mean `conv_dim`"),
        (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
        (["--network_train_unet_only", "--text_encoder_lr", "1e-5"], "--text_encoder_lr has no effect"),
        (["--network_module", "networks.loha"], "--network_module networks.loha is not supported"),
        (["--network_weights", str(tmp_path / "nope.safetensors")], "does not exist"),
        (["--network_alpha", "-1"], "must not be negative"),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            network_arguments.validate_network_args(_parse(argv))
    assert network_arguments.import_network_module("networks.lora_flux").create_network is create_network
