"""The SDXL single-file (SGM) layout: diffusers <-> SGM key rules and SDXL configs read from shapes.

Stability's SGM files (sd_xl_base_1.0.safetensors and its fine-tunes) hold the UNet under
`model.diffusion_model.*` (LDM block names, plus `label_emb.0.{0,2}` for the size/pooled-text
embedding), the VAE under `first_stage_model.*`, CLIP-L in transformers naming under
`conditioner.embedders.0.transformer.text_model.*`, and OpenCLIP bigG under
`conditioner.embedders.1.model.*` (fused q/k/v `in_proj_weight`, `text_projection` stored as the
transpose of a Linear weight, `logit_scale`). Loading is done by diffusers' own single-file loaders
given configs inferred here; the diffusers -> SGM direction is written here because diffusers only
ships the reverse, reusing the SD 1.x UNet/VAE rules of library/models/sd_ldm_layout.py.

`unet_lora_renames(unet)` gives every UNet module's LDM path, which is how sd-scripts names SDXL
LoRA modules (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`).

What shapes cannot tell is fixed by rule: real-width UNets (first block >= 320 channels) use 64-wide
attention heads (SDXL base: 5/10/20 heads), narrower test UNets 16-wide heads (see tiny_sdxl.py);
text encoders use sd_ldm_layout.text_encoder_heads.
"""

from __future__ import annotations

import math
import re

from library.models import sd_ldm_layout as layout

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
BIGG_PREFIX = "conditioner.embedders.1.model."
SDXL_VAE_SCALING_FACTOR = 0.13025
DEFAULT_LOGIT_SCALE = math.log(100.0)  # bigG's trained value; OpenCLIP caps logit_scale there

_ADD_EMBEDDING_TO_LABEL_EMB = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
_BIGG_LAYER_RENAMES = {
    "self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
}
_QKV = ("q", "k", "v")


# ---- diffusers -> SGM ---------------------------------------------------------------------------

def convert_sdxl_unet_to_ldm(unet_state_dict: dict, config) -> dict:
    """SDXL UNet state dict -> LDM names (without the `model.diffusion_model.` prefix)."""
    plain = {k: v for k, v in unet_state_dict.items() if not k.startswith("add_embedding.")}
    converted = layout.convert_unet_to_ldm(plain, config)
    for key, tensor in unet_state_dict.items():
        for old, new in _ADD_EMBEDDING_TO_LABEL_EMB.items():
            if key.startswith(old):
                converted[new + key[len(old):]] = tensor
    return converted


def unet_lora_renames(unet) -> dict[str, str]:
    """diffusers module path -> LDM module path for every module holding weights of an SDXL UNet."""
    own_keys = {key: key for key in unet.state_dict()}
    ldm_to_diffusers = convert_sdxl_unet_to_ldm(own_keys, unet.config)  # values are the diffusers keys
    renames = {}
    for ldm_key, diffusers_key in ldm_to_diffusers.items():
        renames[diffusers_key.rsplit(".", 1)[0]] = ldm_key.rsplit(".", 1)[0]
    return renames


def _strip_text_model(state_dict: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def convert_clip_l_to_sgm(text_encoder_state_dict: dict) -> dict:
    return {CLIP_L_PREFIX + k: v for k, v in _strip_text_model(text_encoder_state_dict).items()}


def _rename_start(rest: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    raise ValueError(f"no OpenCLIP name for text encoder tensor {rest}")


def _cat(tensors: list):
    import torch

    return torch.cat(tensors, dim=0)


def _bigg_layer_tensors(sd: dict, layer: int) -> dict:
    src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
    out = {}
    for kind in ("weight", "bias"):
        out[f"{dst}attn.in_proj_{kind}"] = _cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in _QKV])
    for key, tensor in sd.items():
        rest = key[len(src):]
        if key.startswith(src) and not rest.startswith(tuple(f"self_attn.{p}_proj." for p in _QKV)):
            out[dst + _rename_start(rest, _BIGG_LAYER_RENAMES)] = tensor
    return out


def convert_bigg_to_open_clip(text_encoder_state_dict: dict, num_layers: int, logit_scale=None) -> dict:
    """CLIPTextModelWithProjection state dict -> OpenCLIP layout under `conditioner.embedders.1.model.`."""
    import torch

    sd = _strip_text_model(text_encoder_state_dict)
    projection = sd.pop("text_projection.weight")
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": projection.T,  # OpenCLIP computes x @ text_projection
        "logit_scale": logit_scale if logit_scale is not None else torch.tensor(DEFAULT_LOGIT_SCALE),
    }
    for layer in range(num_layers):
        out.update(_bigg_layer_tensors(sd, layer))
    return {BIGG_PREFIX + k: v for k, v in out.items()}


def diffusers_to_sgm(unet, vae, text_encoder_1, text_encoder_2, logit_scale=None) -> dict:
    """One SGM-layout state dict of the four SDXL parts (tensors shared with the models)."""
    unet_ldm = convert_sdxl_unet_to_ldm(unet.state_dict(), unet.config)
    state = {UNET_PREFIX + k: v for k, v in unet_ldm.items()}
    state.update({VAE_PREFIX + k: v for k, v in layout.convert_vae_to_ldm(vae.state_dict(), vae.config).items()})
    state.update(convert_clip_l_to_sgm(text_encoder_1.state_dict()))
    state.update(convert_bigg_to_open_clip(text_encoder_2.state_dict(), text_encoder_2.config.num_hidden_layers,
                                           logit_scale))
    return state


# ---- configs from an SGM state dict --------------------------------------------------------------

def _sub(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def split_sgm_state_dict(state_dict: dict) -> dict[str, dict]:
    """{"unet", "vae", "clip_l", "bigg"} -> the prefix-free part of an SGM state dict."""
    return {
        "unet": _sub(state_dict, UNET_PREFIX), "vae": _sub(state_dict, VAE_PREFIX),
        "clip_l": _sub(state_dict, CLIP_L_PREFIX), "bigg": _sub(state_dict, BIGG_PREFIX),
    }


def unet_attention_heads(channels: int) -> int:
    head_width = 64 if channels >= 320 else 16
    return max(1, channels // head_width)


def infer_sdxl_unet_config(ldm_unet: dict, pooled_dim: int) -> dict:
    """UNet2DConditionModel config of an SDXL LDM UNet; pooled_dim = bigG's projection width."""
    config = layout.infer_unet_config(ldm_unet, v2=False)
    channels = config["block_out_channels"]
    size_embedding_in = ldm_unet["label_emb.0.0.weight"].shape[1]
    config.update({
        "sample_size": 128,  # 1024 px; pipelines pass explicit sizes
        "attention_head_dim": [unet_attention_heads(c) for c in channels],
        "upcast_attention": False,
        "addition_embed_type": "text_time",
        # six size values (original h/w, crop top/left, target h/w) each get a sinusoidal embedding
        "addition_time_embed_dim": (size_embedding_in - pooled_dim) // 6,
        "projection_class_embeddings_input_dim": size_embedding_in,
    })
    depth = config["transformer_layers_per_block"]
    config["transformer_layers_per_block"] = list(depth) if isinstance(depth, list) else [depth] * len(channels)
    return config


def infer_sdxl_vae_config(ldm_vae: dict) -> dict:
    return {**layout.infer_vae_config(ldm_vae), "scaling_factor": SDXL_VAE_SCALING_FACTOR}


def _layer_count(state_dict: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state_dict if (m := regex.match(k))})


def infer_clip_l_config(ldm_clip_l: dict) -> dict:
    return layout.infer_clip_config(ldm_clip_l)


def infer_bigg_config(open_clip: dict) -> dict:
    """CLIPTextConfig dict (with projection) for bigG in OpenCLIP layout (prefix removed)."""
    token = open_clip["token_embedding.weight"]
    hidden = token.shape[1]
    return {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
        "vocab_size": token.shape[0], "hidden_size": hidden,
        "intermediate_size": open_clip["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _layer_count(open_clip, r"transformer\.resblocks\.(\d+)\."),
        "num_attention_heads": layout.text_encoder_heads(hidden),
        "max_position_embeddings": open_clip["positional_embedding"].shape[0],
        "projection_dim": open_clip["text_projection"].shape[1], "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0,
    }
