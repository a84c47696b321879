"""SD3 / SD3.5 weights in the files users bring (SAI single files, clip_l/clip_g/t5xxl files, diffusers
folders) and back.

Our own converter, with every width read from tensor shapes so tiny test models use the same path as
the real ones (no library writes SAI files). An SAI file holds the MMDiT under `model.diffusion_model.`
(`joint_blocks.N.x_block.attn.qkv`, ...), the VAE under `first_stage_model.` (LDM keys, converted with
library/models/sd_ldm_layout.py) and optionally the text encoders under
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.` (transformers key names). SAI's fused `qkv` linears
split by rows into diffusers' to_q/to_k/to_v; the adaLN rows of the final layer and of the last,
context-pre-only block are (shift, scale) in SAI files and (scale, shift) in diffusers, so those halves
swap. SD3.5 layouts are detected from the keys: `attn2` (dual attention) and `ln_q`/`ln_k` (RMS qk-norm).
The tables below are the one map between SAI and diffusers module names; LoRA names reuse them.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from library.atomic_io import save_safetensors_atomic
from library.errors import UserError
from library.models.weights_io import cpu_state_dict, load_exactly

SAI_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_KEYS = ("clip_l", "clip_g", "t5xxl")
TEXT_ENCODER_PREFIXES = {key: f"text_encoders.{key}.transformer." for key in TEXT_ENCODER_KEYS}
SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR = 1.5305, 0.0609

# SAI module inside a joint block -> the diffusers modules it fuses, in SAI's row order
X_BLOCK_MODULES = {
    "attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.proj": ("attn.to_out.0",),
    "attn.ln_q": ("attn.norm_q",), "attn.ln_k": ("attn.norm_k",),
    "attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "attn2.proj": ("attn2.to_out.0",),
    "attn2.ln_q": ("attn2.norm_q",), "attn2.ln_k": ("attn2.norm_k",),
    "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",), "adaLN_modulation.1": ("norm1.linear",),
}
CONTEXT_BLOCK_MODULES = {
    "attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.proj": ("attn.to_add_out",),
    "attn.ln_q": ("attn.norm_added_q",), "attn.ln_k": ("attn.norm_added_k",),
    "mlp.fc1": ("ff_context.net.0.proj",), "mlp.fc2": ("ff_context.net.2",),
    "adaLN_modulation.1": ("norm1_context.linear",),
}
BLOCK_SIDES = (("x_block", X_BLOCK_MODULES), ("context_block", CONTEXT_BLOCK_MODULES))
GLOBAL_MODULES = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SAI_BLOCK = re.compile(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)")
DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def sd3_sampling_scheduler(shift: float = 3.0):
    """The scheduler SD3 folders ship: flow-matching Euler with shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


# ---- names ------------------------------------------------------------------------------------------

def sai_members(module: str) -> Optional[tuple[str, ...]]:
    """The diffusers modules an SAI module holds ("joint_blocks.0.x_block.attn.qkv" -> to_q, to_k, to_v)."""
    match = SAI_BLOCK.fullmatch(module)
    if match:
        index, side, rest = match.groups()
        members = dict(BLOCK_SIDES)[side].get(rest)
        return None if members is None else tuple(f"transformer_blocks.{index}.{m}" for m in members)
    return (GLOBAL_MODULES[module],) if module in GLOBAL_MODULES else None


def diffusers_to_sai_module(path: str) -> Optional[str]:
    """SAI name of the module a diffusers module path belongs to ("transformer_blocks.0.attn.to_k" ->
    "joint_blocks.0.x_block.attn.qkv"); None for modules SAI files do not name."""
    match = DIFFUSERS_BLOCK.fullmatch(path)
    if match:
        index, rest = match.groups()
        for side, table in BLOCK_SIDES:
            for sai, members in table.items():
                if rest in members:
                    return f"joint_blocks.{index}.{side}.{sai}"
        return None
    return next((sai for sai, diffusers in GLOBAL_MODULES.items() if diffusers == path), None)


def _swap_halves(tensor):
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block_indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def _swapped_modules(pre_only_block: Optional[int]) -> set[str]:
    swapped = {"final_layer.adaLN_modulation.1"}
    if pre_only_block is not None:
        swapped.add(f"joint_blocks.{pre_only_block}.context_block.adaLN_modulation.1")
    return swapped


# ---- transformer: SAI <-> diffusers -----------------------------------------------------------------

def sai_to_diffusers(state: dict, source: str = "the checkpoint") -> dict:
    """MMDiT tensors (prefix removed) -> diffusers SD3Transformer2DModel names."""
    blocks = _block_indices(state, r"joint_blocks\.(\d+)\.")
    last = blocks[-1] if blocks else None
    pre_only = last if last is not None and f"joint_blocks.{last}.context_block.attn.proj.weight" not in state else None
    swapped = _swapped_modules(pre_only)
    out = {}
    for key, tensor in state.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = tensor
            continue
        module, _, param = key.rpartition(".")
        members = sai_members(module)
        if members is None or param not in ("weight", "bias"):
            raise UserError(f"{source}: unexpected MMDiT tensor {key}; the file is not an SD3/SD3.5 checkpoint")
        if module in swapped:
            tensor = _swap_halves(tensor)
        for member, part in zip(members, tensor.chunk(len(members), dim=0) if len(members) > 1 else (tensor,)):
            out[f"{member}.{param}"] = part
    return out


def diffusers_to_sai(state: dict) -> dict:
    """Inverse of sai_to_diffusers (fused linears concatenated back, halves swapped back)."""
    import torch

    blocks = _block_indices(state, r"transformer_blocks\.(\d+)\.")
    last = blocks[-1] if blocks else None
    pre_only = last if last is not None and f"transformer_blocks.{last}.attn.to_add_out.weight" not in state else None
    swapped = _swapped_modules(pre_only)
    groups: dict[tuple[str, str], dict[int, Any]] = {}
    out = {}
    for key, tensor in state.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = tensor
            continue
        module, _, param = key.rpartition(".")
        sai = diffusers_to_sai_module(module)
        if sai is None:
            raise ValueError(f"diffusers SD3 tensor {key} has no SAI name")
        groups.setdefault((sai, param), {})[sai_members(sai).index(module)] = tensor
    for (sai, param), parts in groups.items():
        tensor = torch.cat([parts[i] for i in sorted(parts)], dim=0) if len(parts) > 1 else parts[0]
        out[f"{sai}.{param}"] = _swap_halves(tensor) if sai in swapped else tensor
    return out


def infer_transformer_config(state: dict) -> dict:
    """SD3Transformer2DModel config from SAI tensor shapes (SD3 medium, SD3.5 medium/large, tiny)."""
    proj = state["x_embedder.proj.weight"]  # [inner, in_channels, patch, patch]
    inner, patch = proj.shape[0], proj.shape[2]
    num_layers = len(_block_indices(state, r"joint_blocks\.(\d+)\."))
    ln_q = state.get("joint_blocks.0.x_block.attn.ln_q.weight")
    # the head width is not in the shapes without qk-norm: 64 in every released model, 16 in tiny presets
    head_dim = ln_q.shape[0] if ln_q is not None else (64 if inner >= 512 else 16)
    pos_max = math.isqrt(state["pos_embed"].shape[1])
    dual = _block_indices(state, r"joint_blocks\.(\d+)\.x_block\.attn2\.")
    return {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128 if pos_max >= 128 else pos_max // 2,
        "patch_size": patch, "in_channels": proj.shape[1], "num_layers": num_layers,
        "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
        "joint_attention_dim": state["context_embedder.weight"].shape[1],
        "caption_projection_dim": state["context_embedder.weight"].shape[0],
        "pooled_projection_dim": state["y_embedder.mlp.0.weight"].shape[1],
        "out_channels": state["final_layer.linear.weight"].shape[0] // (patch * patch),
        "pos_embed_max_size": pos_max, "dual_attention_layers": tuple(dual),
        "qk_norm": "rms_norm" if ln_q is not None else None,
    }


def build_transformer(sai_state: dict, source: str, dtype=None):
    import torch
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    for key in ("x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight", "pos_embed",
                "final_layer.linear.weight"):
        if key not in sai_state:
            raise UserError(f"{source} is missing the MMDiT tensor {key}; the file is incomplete or not SD3")
    config = infer_transformer_config(sai_state)
    with init_empty_weights():
        model = SD3Transformer2DModel.from_config(config)
    state = {k: v.to(dtype or torch.float32) for k, v in sai_to_diffusers(sai_state, source).items()}
    load_exactly(model, state, f"{source}: MMDiT", assign=True)
    return model


# ---- VAE and text encoders --------------------------------------------------------------------------

def build_vae(ldm_state: dict, source: str, dtype=None):
    """AutoencoderKL from LDM VAE keys through diffusers' single-file loader, config from shapes."""
    import json

    from diffusers import AutoencoderKL

    from library.models import sd_ldm_layout as layout

    if "encoder.conv_in.weight" not in ldm_state:
        raise UserError(f"{source} holds no VAE (first_stage_model.encoder.*); SD3 single files include it")
    config = {**layout.infer_vae_config(ldm_state), "scaling_factor": SD3_VAE_SCALING_FACTOR,
              "shift_factor": SD3_VAE_SHIFT_FACTOR}
    if config["latent_channels"] != 16:
        raise UserError(f"{source}: the VAE has {config['latent_channels']} latent channels; SD3 uses 16")
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "vae"))
        with open(os.path.join(folder, "vae", "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        vae = AutoencoderKL.from_single_file(ldm_state, config=folder, subfolder="vae", local_files_only=True)
    return vae.to(dtype) if dtype is not None else vae


def build_clip(state: dict, big_g: bool, source: str, dtype=None):
    """CLIPTextModelWithProjection (CLIP-L or CLIP-G) from transformers keys (`text_model.*`,
    `text_projection.weight`), config from shapes."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from library.models import sd_ldm_layout as layout

    inner = {k.removeprefix("text_model."): v for k, v in state.items()
             if not k.startswith(("text_projection", "logit_scale"))}
    if "embeddings.token_embedding.weight" not in inner or "text_projection.weight" not in state:
        raise UserError(f"{source} holds no CLIP text encoder with projection (text_model.*, text_projection)")
    config = layout.infer_clip_config(inner)
    config.update(projection_dim=state["text_projection.weight"].shape[0],
                  hidden_act="gelu" if big_g else "quick_gelu", pad_token_id=0 if big_g else 49407)
    if big_g and config["hidden_size"] >= 512:
        config["num_attention_heads"] = config["hidden_size"] // 64
    model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    full = {f"text_model.{k}": v.to(dtype or torch.float32) for k, v in inner.items()}
    full["text_projection.weight"] = state["text_projection.weight"].to(dtype or torch.float32)
    load_exactly(model, full, f"{source}: {'CLIP-G' if big_g else 'CLIP-L'}", assign=True)
    return model


def build_t5(state: dict, source: str, dtype=None):
    import torch
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    from library.models.flux_checkpoint import infer_t5_config

    if "shared.weight" not in state or "encoder.block.0.layer.0.SelfAttention.q.weight" not in state:
        raise UserError(f"{source} holds no T5 encoder (shared.weight, encoder.block.*)")
    with init_empty_weights():
        model = T5EncoderModel(T5Config(**infer_t5_config(state)))
    state = {k: v.to(dtype or torch.float32) for k, v in state.items()}
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    load_exactly(model, state, f"{source}: T5", assign=True)
    model.tie_weights()
    return model


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_text_encoder_file(path: str, key: str, dtype=None):
    """--clip_l / --clip_g / --t5xxl file (transformers keys, optionally under the SAI prefix)."""
    from library.models.flux_checkpoint import load_t5xxl, read_safetensors_file

    if key == "t5xxl":
        return load_t5xxl(path, dtype)
    state = read_safetensors_file(path, f"--{key}")
    prefix = TEXT_ENCODER_PREFIXES[key]
    if any(k.startswith(prefix) for k in state):
        state = _sub(state, prefix)
    return build_clip(state, key == "clip_g", f"--{key} {path}", dtype)


# ---- whole models -----------------------------------------------------------------------------------

@dataclass
class SD3Models:
    transformer: Any
    vae: Any
    text_encoders: list  # CLIP-L, CLIP-G, T5 (None where neither the file nor a flag had one)
    tokenizers: list


def load_sd3_single_file(path: str, dtype=None, with_vae: bool = True) -> SD3Models:
    """MMDiT and VAE (unless with_vae is False; and the text encoders the file holds) of an SAI single file."""
    from library.models.flux_checkpoint import read_safetensors_file

    state = read_safetensors_file(path, "--pretrained_model_name_or_path")
    mmdit = _sub(state, SAI_PREFIX) if any(k.startswith(SAI_PREFIX) for k in state) else \
        {k: v for k, v in state.items() if k.startswith(("joint_blocks.", "x_embedder", "t_embedder", "y_embedder",
                                                        "context_embedder", "final_layer", "pos_embed"))}
    if "x_embedder.proj.weight" not in mmdit:
        from library.models.checkpoint_detect import detect_checkpoint_family, wrong_family_error

        raise wrong_family_error(path, detect_checkpoint_family(state))
    transformer = build_transformer(mmdit, path, dtype)
    vae_state = _sub(state, VAE_PREFIX) if with_vae else None
    vae = build_vae(vae_state, path, dtype) if vae_state else None
    encoders = []
    for key in TEXT_ENCODER_KEYS:
        part = _sub(state, TEXT_ENCODER_PREFIXES[key])
        if not part:
            encoders.append(None)
        elif key == "t5xxl":
            encoders.append(build_t5(part, f"{path} ({key})", dtype))
        else:
            encoders.append(build_clip(part, key == "clip_g", f"{path} ({key})", dtype))
    return SD3Models(transformer, vae, encoders, [None, None, None])


def load_sd3_folder(source: str, dtype, skip_encoders: tuple[bool, bool, bool], with_vae: bool = True) -> SD3Models:
    """Transformer, VAE (unless with_vae is False), tokenizers and (unless skipped) text encoders of a
    diffusers SD3 folder."""
    import json

    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    from library.models.checkpoint_detect import wrong_family_error
    from library.families.table import family_of_pipeline_class

    index = os.path.join(source, "model_index.json")
    if not os.path.isfile(index):
        raise UserError(f"{source} is a folder but not a diffusers model (no model_index.json); pass an SD3 "
                        "diffusers folder or an SAI single file (sd3.5_large.safetensors)")
    with open(index, encoding="utf-8") as f:
        family = family_of_pipeline_class(json.load(f).get("_class_name", "")) or "unknown"
    if family != "sd3":
        raise wrong_family_error(source, family)
    dtype = dtype or torch.float32
    common = {"local_files_only": True}
    try:
        transformer = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **common) if with_vae else None
        encoders = [
            None if skip_encoders[0] else CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder", dtype=dtype, **common),
            None if skip_encoders[1] else CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", dtype=dtype, **common),
            None if skip_encoders[2] else T5EncoderModel.from_pretrained(
                source, subfolder="text_encoder_3", dtype=dtype, **common),
        ]
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder=name, **common)
                      for name in ("tokenizer", "tokenizer_2")]
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the SD3 diffusers model {source}: {e}") from e
    return SD3Models(transformer, vae, encoders, [*tokenizers, None])


def load_sd3_models(source: str, clip_l: Optional[str] = None, clip_g: Optional[str] = None,
                    t5xxl: Optional[str] = None, t5_tokenizer: Optional[str] = None, dtype=None,
                    with_vae: bool = True) -> SD3Models:
    """An SAI single file or a diffusers folder; --clip_l/--clip_g/--t5xxl files replace its encoders.
    with_vae=False reads no VAE: models.vae is None."""
    from library.models.clip_tokenizer import build_clip_tokenizer
    from library.models.t5_tokenizer import load_t5_tokenizer

    files = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl}
    if os.path.isfile(source):
        models = load_sd3_single_file(source, dtype, with_vae)
        if with_vae and models.vae is None:
            raise UserError(f"{source} holds no VAE (first_stage_model.*); use a full SAI SD3 checkpoint")
        folder = None
    elif os.path.isdir(source):
        models = load_sd3_folder(source, dtype, tuple(bool(files[k]) for k in TEXT_ENCODER_KEYS), with_vae)
        folder = source
    else:
        raise UserError(f"--pretrained_model_name_or_path {source}: no such file or folder (SD3 loads from an SAI "
                        "single file or a local diffusers folder)")
    for index, key in enumerate(TEXT_ENCODER_KEYS):
        if files[key]:
            models.text_encoders[index] = load_text_encoder_file(files[key], key, dtype)
    missing = [f"--{key}" for key, encoder in zip(TEXT_ENCODER_KEYS, models.text_encoders) if encoder is None]
    if missing:
        raise UserError(f"{source} does not include every text encoder: also pass {', '.join(missing)} "
                        "(clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors)")
    tokenizers = models.tokenizers
    tokenizers[0] = tokenizers[0] or build_clip_tokenizer()
    tokenizers[1] = tokenizers[1] or build_clip_tokenizer(pad_token="!")  # SD3's CLIP-G pads with "!" (id 0)
    folder_tokenizer = os.path.join(folder, "tokenizer_3") if folder else None
    if not t5_tokenizer and folder_tokenizer and os.path.isdir(folder_tokenizer):
        t5_tokenizer = folder_tokenizer
    tokenizers[2] = load_t5_tokenizer(t5_tokenizer)
    return models


# ---- writers ----------------------------------------------------------------------------------------

def text_encoder_state(encoder, key: str, dtype=None) -> dict:
    """transformers keys as the released files hold them (CLIP under text_model., T5 without the tied copy)."""
    state = {k: v for k, v in cpu_state_dict(encoder.state_dict(), dtype).items() if "position_ids" not in k}
    if key == "t5xxl":
        state.pop("encoder.embed_tokens.weight", None)
        return state
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


def save_text_encoder_file(encoder, path: str, dtype=None) -> str:
    key = "t5xxl" if encoder.__class__.__name__.startswith("T5") else \
        ("clip_g" if encoder.config.hidden_act == "gelu" else "clip_l")
    save_safetensors_atomic(text_encoder_state(encoder, key, dtype), path)
    return path


def save_sd3_single_file(transformer, vae, text_encoders: Optional[list], path: str, dtype=None,
                         metadata: Optional[dict] = None) -> str:
    """An SAI single file: MMDiT, VAE and (when given: CLIP-L, CLIP-G, T5) the text encoders."""
    from library.models import sd_ldm_layout as layout

    tensors = {SAI_PREFIX + k: v for k, v in diffusers_to_sai(cpu_state_dict(transformer.state_dict(), dtype)).items()}
    if vae is not None:
        ldm = layout.convert_vae_to_ldm(cpu_state_dict(vae.state_dict(), dtype), vae.config)
        tensors.update({VAE_PREFIX + k: v.contiguous() for k, v in ldm.items()})
    for key, encoder in zip(TEXT_ENCODER_KEYS, text_encoders or []):
        if encoder is not None:
            prefix = TEXT_ENCODER_PREFIXES[key]
            tensors.update({prefix + k: v for k, v in text_encoder_state(encoder, key, dtype).items()})
    save_safetensors_atomic(tensors, path, metadata)
    return path
