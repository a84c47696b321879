"""The SD 1.x/2.x single-file (LDM) layout: diffusers -> LDM key rules and configs read from shapes.

Saving: `diffusers_to_ldm(unet, vae, text_encoder, v2)` renames diffusers state dicts to the names
A1111/ComfyUI/`from_single_file` read (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.text_model.*` or, for SD 2.x, OpenCLIP's `cond_stage_model.model.*`).
The rules are generated from the model configs, so tiny test models convert like real ones. diffusers
ships only the reverse direction (LDM -> diffusers), hence this module.

Loading: `infer_*_config(ldm_state_dict)` read block widths, depths and attention sizes from tensor
shapes, so any SD-layout file (real or tiny) gets a matching diffusers config without hard-coded
sizes. What shapes cannot tell is fixed by rule: SD 1.x UNets use 8 attention heads per block, SD 2.x
UNets 64-channel heads; text encoders of real width (>= 512) use 64-wide heads (CLIP-L 12, OpenCLIP-H
16), narrower test encoders use 4 heads like library/tiny_models/sd.py.
"""

from __future__ import annotations

import math
import re

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SD_VAE_SCALING_FACTOR = 0.18215

_UNET_RESNET_RENAMES = {
    "norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET_RENAMES = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION_RENAMES = {
    "group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out.",
}
_OPEN_CLIP_LAYER_RENAMES = {
    "self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
}


def _rename_start(rest: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _apply_prefix_rules(state_dict: dict, rules: list[tuple[str, str, dict]], what: str) -> dict:
    """Rename every key by the longest matching (diffusers prefix, LDM prefix, inner renames) rule."""
    rules = sorted(rules, key=lambda rule: len(rule[0]), reverse=True)
    converted = {}
    for key, tensor in state_dict.items():
        rule = next((r for r in rules if key.startswith(r[0])), None)
        if rule is None:
            raise ValueError(f"no LDM name for {what} tensor {key}")  # a model we do not support
        old_prefix, new_prefix, inner = rule
        converted[new_prefix + _rename_start(key[len(old_prefix):], inner)] = tensor
    return converted


def unet_key_rules(config) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, LDM prefix, inner renames) for an SD-layout UNet2DConditionModel config."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    rules = [
        ("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET_RENAMES),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET_RENAMES),
    ]
    for level in range(levels):
        for j in range(per_level):
            ldm = f"input_blocks.{1 + level * (per_level + 1) + j}"
            rules.append((f"down_blocks.{level}.resnets.{j}.", f"{ldm}.0.", _UNET_RESNET_RENAMES))
            rules.append((f"down_blocks.{level}.attentions.{j}.", f"{ldm}.1.", {}))
        if level < levels - 1:
            ldm = f"input_blocks.{(level + 1) * (per_level + 1)}.0.op."
            rules.append((f"down_blocks.{level}.downsamplers.0.conv.", ldm, {}))
        for j in range(per_level + 1):
            ldm = f"output_blocks.{level * (per_level + 1) + j}"
            rules.append((f"up_blocks.{level}.resnets.{j}.", f"{ldm}.0.", _UNET_RESNET_RENAMES))
            rules.append((f"up_blocks.{level}.attentions.{j}.", f"{ldm}.1.", {}))
        if level < levels - 1:
            # the upsampler follows the resnet (and the attention, if the up block has them)
            slot = 2 if config["up_block_types"][level].startswith("CrossAttn") else 1
            ldm = f"output_blocks.{level * (per_level + 1) + per_level}.{slot}."
            rules.append((f"up_blocks.{level}.upsamplers.0.", ldm, {}))
    return rules


def ldm_unet_key_to_diffusers(ldm_key: str, rules: list[tuple[str, str, dict]]) -> str | None:
    """The diffusers name of an LDM UNet key (prefix removed), by `unet_key_rules`; None if no rule fits."""
    for diffusers_prefix, ldm_prefix, inner in sorted(rules, key=lambda rule: len(rule[1]), reverse=True):
        if ldm_key.startswith(ldm_prefix):
            reverse = {new: old for old, new in inner.items()}
            return diffusers_prefix + _rename_start(ldm_key[len(ldm_prefix):], reverse)
    return None


def diffusers_unet_key_to_ldm(diffusers_key: str, rules: list[tuple[str, str, dict]]) -> str:
    """The LDM name (prefix-free) of a diffusers UNet key, by `unet_key_rules`."""
    return next(iter(_apply_prefix_rules({diffusers_key: None}, rules, "UNet")))


def vae_key_rules(config) -> list[tuple[str, str, dict]]:
    levels = len(config["block_out_channels"])
    rules = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION_RENAMES),
        ]
        rules += [
            (f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", _VAE_RESNET_RENAMES) for k in range(2)
        ]
    for level in range(levels):
        up = levels - 1 - level  # LDM numbers decoder levels from the lowest resolution upward
        rules += [
            (f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block.", {}),
            (f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample.", {}),
            (f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{up}.block.", {}),
            (f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{up}.upsample.", {}),
        ]
    return rules


def _rename_vae_resnet_shortcuts(key: str) -> str:
    return re.sub(r"(\.block\.\d+\.)conv_shortcut\.", r"\1nin_shortcut.", key)


def convert_unet_to_ldm(unet_state_dict: dict, config) -> dict:
    return _apply_prefix_rules(unet_state_dict, unet_key_rules(config), "UNet")


def convert_vae_to_ldm(vae_state_dict: dict, config) -> dict:
    converted = {}
    for key, tensor in _apply_prefix_rules(vae_state_dict, vae_key_rules(config), "VAE").items():
        key = _rename_vae_resnet_shortcuts(key)
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        converted[key] = tensor
    return converted


def _strip_text_model(state_dict: dict) -> dict:
    """transformers 5 flattens CLIPTextModel (no `text_model.`); accept either naming."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def convert_clip_to_ldm(text_encoder_state_dict: dict) -> dict:
    return {CLIP_PREFIX + k: v for k, v in _strip_text_model(text_encoder_state_dict).items()}


def convert_clip_to_open_clip(text_encoder_state_dict: dict, num_layers: int) -> dict:
    """SD 2.x text encoder in OpenCLIP layout (fused q/k/v `in_proj`).

    SD 2.x uses OpenCLIP-H's penultimate layer, so diffusers holds one layer fewer than the original
    file. Like sd-scripts, we write a copy of the last layer as that dropped layer, an identity
    `text_projection` and a `logit_scale`, so tools expecting the full OpenCLIP layout load the file.
    """
    import torch

    sd = _strip_text_model(text_encoder_state_dict)
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
    }
    for layer in range(num_layers):
        src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for key, tensor in sd.items():
            rest = key[len(src):]
            if not key.startswith(src) or rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                continue  # q/k/v went into in_proj above
            out[dst + _rename_start(rest, _OPEN_CLIP_LAYER_RENAMES)] = tensor
    last, dummy = f"transformer.resblocks.{num_layers - 1}.", f"transformer.resblocks.{num_layers}."
    for key in [k for k in out if k.startswith(last)]:
        out[dummy + key[len(last):]] = out[key].clone()
    hidden = out["token_embedding.weight"].shape[1]
    out["text_projection"] = torch.eye(hidden, dtype=out["token_embedding.weight"].dtype)
    out["logit_scale"] = torch.tensor(math.log(100.0))
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def diffusers_to_ldm(unet, vae, text_encoder, v2: bool) -> dict:
    """One LDM-layout state dict (tensors shared with the models, not copied) for the three parts."""
    state = {UNET_PREFIX + k: v for k, v in convert_unet_to_ldm(unet.state_dict(), unet.config).items()}
    state.update({VAE_PREFIX + k: v for k, v in convert_vae_to_ldm(vae.state_dict(), vae.config).items()})
    te_state = text_encoder.state_dict()
    if v2:
        state.update(convert_clip_to_open_clip(te_state, text_encoder.config.num_hidden_layers))
    else:
        state.update(convert_clip_to_ldm(te_state))
    return state


# ---- configs from an LDM state dict --------------------------------------------------------------

def _sub(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def text_encoder_heads(hidden_size: int) -> int:
    return hidden_size // 64 if hidden_size >= 512 else 4


def infer_unet_config(ldm_unet: dict, v2: bool) -> dict:
    """UNet2DConditionModel config for an LDM UNet state dict (prefix already removed)."""
    input_ids = _indices(ldm_unet, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in input_ids if f"input_blocks.{i}.0.op.weight" in ldm_unet]
    levels = len(downsamplers) + 1
    per_level = (len(input_ids) - 1 - len(downsamplers)) // levels
    first_of_level = [1 + level * (per_level + 1) for level in range(levels)]
    channels = [ldm_unet[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first_of_level]
    down_attn = [f"input_blocks.{i}.1.proj_in.weight" in ldm_unet for i in first_of_level]
    up_attn = [f"output_blocks.{level * (per_level + 1)}.1.proj_in.weight" in ldm_unet for level in range(levels)]
    to_k = next(v for k, v in ldm_unet.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in ldm_unet.items() if k.endswith(".proj_in.weight"))
    depth = [
        max(1, len(_indices(ldm_unet, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))) for i in first_of_level
    ]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 96 if v2 else 64,  # 768 px for SD 2.x-768, 512 px otherwise; pipelines pass sizes
        "in_channels": ldm_unet["input_blocks.0.0.weight"].shape[1],
        "out_channels": ldm_unet["out.2.weight"].shape[0],
        "layers_per_block": per_level,
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "cross_attention_dim": to_k.shape[1],
        # diffusers' "attention_head_dim" of SD UNets holds the number of heads
        "attention_head_dim": [max(1, c // 64) for c in channels] if v2 else 8,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
        "use_linear_projection": proj_in.ndim == 2,
        "upcast_attention": v2,
        "norm_num_groups": 32,
    }


def infer_vae_config(ldm_vae: dict) -> dict:
    levels = _indices(ldm_vae, r"encoder\.down\.(\d+)\.")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": ldm_vae["encoder.conv_in.weight"].shape[1],
        "out_channels": ldm_vae["decoder.conv_out.weight"].shape[0],
        "latent_channels": ldm_vae["encoder.conv_out.weight"].shape[0] // 2,  # mean and log-variance
        "block_out_channels": [ldm_vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "layers_per_block": len(_indices(ldm_vae, r"encoder\.down\.0\.block\.(\d+)\.")),
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": SD_VAE_SCALING_FACTOR,
        "use_quant_conv": "quant_conv.weight" in ldm_vae,
        "use_post_quant_conv": "post_quant_conv.weight" in ldm_vae,
    }


def _clip_config(vocab: int, hidden: int, intermediate: int, layers: int, positions: int, **extra) -> dict:
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": text_encoder_heads(hidden), "max_position_embeddings": positions,
        "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, **extra,
    }


def infer_clip_config(ldm_clip: dict) -> dict:
    """CLIPTextConfig dict for SD 1.x's CLIP-L layout (CLIP_PREFIX removed)."""
    token = ldm_clip["embeddings.token_embedding.weight"]
    return _clip_config(
        vocab=token.shape[0], hidden=token.shape[1],
        intermediate=ldm_clip["encoder.layers.0.mlp.fc1.weight"].shape[0],
        layers=len(_indices(ldm_clip, r"encoder\.layers\.(\d+)\.")),
        positions=ldm_clip["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu", projection_dim=token.shape[1], pad_token_id=49407,
    )


def infer_open_clip_config(ldm_open_clip: dict) -> dict:
    """CLIPTextConfig dict for SD 2.x's OpenCLIP layout (OPEN_CLIP_PREFIX removed); last layer dropped."""
    token = ldm_open_clip["token_embedding.weight"]
    projection = ldm_open_clip.get("text_projection")
    return _clip_config(
        vocab=token.shape[0], hidden=token.shape[1],
        intermediate=ldm_open_clip["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        layers=len(_indices(ldm_open_clip, r"transformer\.resblocks\.(\d+)\.")) - 1,
        positions=ldm_open_clip["positional_embedding"].shape[0],
        hidden_act="gelu", projection_dim=projection.shape[1] if projection is not None else token.shape[1],
        pad_token_id=0,
    )


def split_ldm_state_dict(state_dict: dict) -> dict[str, dict]:
    """{"unet", "vae", "clip", "open_clip"} -> the prefix-free part of an LDM state dict."""
    return {
        "unet": _sub(state_dict, UNET_PREFIX), "vae": _sub(state_dict, VAE_PREFIX),
        "clip": _sub(state_dict, CLIP_PREFIX), "open_clip": _sub(state_dict, OPEN_CLIP_PREFIX),
    }
