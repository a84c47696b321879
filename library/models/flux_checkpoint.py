"""FLUX.1 weights in the files users bring: BFL transformer files, ae/clip_l/t5xxl files, and back.

Our own converter (no library does this for every size): diffusers' single-file FLUX converter
hard-codes the 3072/12288 widths of the real model, so tiny test models cannot use it. Here every
width comes from tensor shapes. The tables below are the one map between BFL and diffusers module
names; networks/ reuses them for LoRA names (a fused BFL linear = several diffusers linears).

- Transformer: BFL layout (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...), with or
  without `model.diffusion_model.`, any float dtype including float8_e4m3fn, or diffusers names.
  Fused BFL linears split into diffusers' q/k/v (and the single blocks' MLP input) by rows; BFL's
  final adaLN rows are (shift, scale), diffusers' (scale, shift), so those halves swap. Dev has
  `guidance_in`; schnell does not (`is_schnell`).
- AE (`ae.safetensors`, LDM VAE keys, no quant convs): diffusers' own LDM VAE loader with a config read
  from shapes (library/models/sd_ldm_layout.py) and FLUX's scale 0.3611 / shift 0.1159.
- CLIP-L (`clip_l.safetensors`) and T5 (`t5xxl_fp16`/fp8): transformers key names, configs read from
  shapes, fp8 upcast to the requested dtype.
Writers produce the same layouts (tests use them to make single files from tiny models). SD3 reuses the
T5 encoder (`build_t5_encoder`) and the 16-channel VAE (`build_16_channel_vae`) builders.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from library.atomic_io import save_safetensors_atomic
from library.errors import UserError
from library.models import checkpoint_detect as detect
from library.models.weights_io import (
    TransformerFileLayout, block_indices, build_transformer_from_state, cpu_state_dict, from_single_file_with_config,
    load_exactly, pop_required, strip_prefix, swap_halves,
)

BFL_PREFIX = "model.diffusion_model."
FLUX_AE_SCALING_FACTOR, FLUX_AE_SHIFT_FACTOR = 0.3611, 0.1159
FLUX_MLP_RATIO = 4  # diffusers' FluxSingleTransformerBlock cannot take another ratio

# BFL linear -> the diffusers linears it fuses, in BFL's row order (weights and biases alike)
DOUBLE_BLOCK_LINEARS = {
    "img_mod.lin": ("norm1.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
DOUBLE_BLOCK_NORMS = {  # BFL `<name>.scale` -> diffusers `<name>.weight`
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
}
SINGLE_BLOCK_LINEARS = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
SINGLE_BLOCK_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
GLOBAL_LINEARS = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves swapped
}
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}
BLOCK_LISTS = (("double_blocks", "transformer_blocks", DOUBLE_BLOCK_LINEARS, DOUBLE_BLOCK_NORMS),
               ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK_LINEARS, SINGLE_BLOCK_NORMS))


def flux_sampling_scheduler():
    """The scheduler FLUX.1 folders ship: flow-matching Euler with resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


# ---- names ------------------------------------------------------------------------------------------

def diffusers_to_bfl_module(path: str) -> Optional[str]:
    """BFL name of the linear a diffusers module path belongs to ("transformer_blocks.0.attn.to_k" ->
    "double_blocks.0.img_attn.qkv"); None for modules BFL does not have as a linear."""
    for bfl_list, diffusers_list, linears, _ in BLOCK_LISTS:
        match = re.fullmatch(rf"{diffusers_list}\.(\d+)\.(.+)", path)
        if match:
            index, rest = match.groups()
            for bfl_name, members in linears.items():
                if rest in members:
                    return f"{bfl_list}.{index}.{bfl_name}"
            return None
    return next((bfl for bfl, diffusers in GLOBAL_LINEARS.items() if diffusers == path), None)


def _move_global_linears(state: dict, out: dict, to_diffusers: bool) -> None:
    """Moves the global linears' tensors from `state` into `out` under the other layout's names (final adaLN
    halves swapped)."""
    for bfl_name, diffusers_name in GLOBAL_LINEARS.items():
        source, target = (bfl_name, diffusers_name) if to_diffusers else (diffusers_name, bfl_name)
        for kind in ("weight", "bias"):
            if f"{source}.{kind}" in state:
                tensor = state.pop(f"{source}.{kind}")
                out[f"{target}.{kind}"] = swap_halves(tensor) if bfl_name in SWAPPED_HALVES else tensor


# ---- transformer: BFL <-> diffusers -----------------------------------------------------------------

def bfl_to_diffusers(state: dict, source: str = "the checkpoint") -> dict:
    """BFL transformer tensors (prefix already removed) -> diffusers names; splits are views, not copies."""
    state = dict(state)
    inner = state["img_in.weight"].shape[0]
    out = {}

    def take(key):
        return pop_required(state, key, source, "FLUX transformer")

    for bfl_list, diffusers_list, linears, norms in BLOCK_LISTS:
        for i in block_indices(state, bfl_list):
            for bfl_name, members in linears.items():
                for kind in ("weight", "bias"):
                    tensor = take(f"{bfl_list}.{i}.{bfl_name}.{kind}")
                    sizes = [inner] * (len(members) - 1) + [tensor.shape[0] - inner * (len(members) - 1)]
                    for member, part in zip(members, tensor.split(sizes, dim=0)):
                        out[f"{diffusers_list}.{i}.{member}.{kind}"] = part
            for bfl_name, diffusers_name in norms.items():
                out[f"{diffusers_list}.{i}.{diffusers_name}.weight"] = take(f"{bfl_list}.{i}.{bfl_name}.scale")
    _move_global_linears(state, out, to_diffusers=True)
    if state:
        raise UserError(f"{source} holds tensors a FLUX.1 transformer does not have, such as {sorted(state)[0]}; "
                        "it is another model or a variant this loader does not know")
    return out


def diffusers_to_bfl(state: dict) -> dict:
    """Inverse of bfl_to_diffusers: fused linears are concatenated (copies)."""
    import torch

    state = dict(state)
    out = {}
    for bfl_list, diffusers_list, linears, norms in BLOCK_LISTS:
        for i in block_indices(state, diffusers_list):
            for bfl_name, members in linears.items():
                for kind in ("weight", "bias"):
                    parts = [state.pop(f"{diffusers_list}.{i}.{member}.{kind}") for member in members]
                    out[f"{bfl_list}.{i}.{bfl_name}.{kind}"] = parts[0] if len(parts) == 1 else torch.cat(parts)
            for bfl_name, diffusers_name in norms.items():
                out[f"{bfl_list}.{i}.{bfl_name}.scale"] = state.pop(f"{diffusers_list}.{i}.{diffusers_name}.weight")
    _move_global_linears(state, out, to_diffusers=False)
    if state:
        raise ValueError(f"no BFL name for diffusers tensors {sorted(state)[:3]}")
    return out


def rope_axes_for_head_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX splits each head into (time, height, width) rotary axes: 128 -> (16, 56, 56); the same rule
    (an eighth, rounded up to keep every axis even, then two equal halves) gives (4, 6, 6) for 16."""
    first = max(2, (head_dim // 8) // 2 * 2)
    while (head_dim - first) % 4:
        first += 2
    return first, (head_dim - first) // 2, (head_dim - first) // 2


def infer_transformer_config(state: dict, source: str = "the checkpoint") -> dict:
    """FluxTransformer2DModel config from diffusers-named tensors."""
    inner, in_channels = state["x_embedder.weight"].shape
    norm_key = next((k for k in ("transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight")
                     if k in state), None)
    if norm_key is None:
        raise UserError(f"{source} has no transformer blocks; it is not a complete FLUX.1 transformer")
    head_dim = state[norm_key].shape[0]
    single = block_indices(state, "single_transformer_blocks")
    if single and state["single_transformer_blocks.0.proj_mlp.weight"].shape[0] != FLUX_MLP_RATIO * inner:
        raise UserError(f"{source}: the single blocks' MLP is not {FLUX_MLP_RATIO}x the width; not a FLUX.1 model")
    out_channels = state["proj_out.weight"].shape[0]
    return {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": int(in_channels),
        "out_channels": None if out_channels == in_channels else int(out_channels),
        "num_layers": len(block_indices(state, "transformer_blocks")), "num_single_layers": len(single),
        "attention_head_dim": int(head_dim), "num_attention_heads": int(inner // head_dim),
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in state,
        "axes_dims_rope": list(rope_axes_for_head_dim(int(head_dim))),
    }


# a BFL file (prefixed or not) or a diffusers-named file
TRANSFORMER_FILE_LAYOUT = TransformerFileLayout("FLUX.1 transformer", BFL_PREFIX, "img_in.weight", "x_embedder.weight",
                                                bfl_to_diffusers, "img_in / x_embedder weights")


def load_flux_transformer(path: str, dtype=None):
    """(transformer, is_schnell) from a single file; dtype None keeps the file's dtype (e.g. fp8). The model is built
    on the meta device around the file's tensors: no second copy."""
    from diffusers import FluxTransformer2DModel

    state = read_safetensors_file(path, "--pretrained_model_name_or_path")
    detect.check_checkpoint_family(path, state.keys(), {"flux"})
    diffusers_state = TRANSFORMER_FILE_LAYOUT.diffusers_state(state, path)
    config = infer_transformer_config(diffusers_state, path)
    transformer = build_transformer_from_state(FluxTransformer2DModel, config, diffusers_state, dtype, path,
                                               "FLUX.1 transformer")
    return transformer, not config["guidance_embeds"]


def is_schnell_file(path: str) -> bool:
    """Without loading tensors: a FLUX transformer file without guidance weights is schnell."""
    keys = detect.read_checkpoint_keys(path)
    return not any("guidance_in." in k or "guidance_embedder." in k for k in keys)


# ---- AE, CLIP-L, T5 ---------------------------------------------------------------------------------

def read_safetensors_file(path: str, flag: str) -> dict:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    if not path.endswith((".safetensors", ".sft")):
        raise UserError(f"{flag} {path}: use a .safetensors (or .sft) file")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{flag} {path} is not a readable safetensors file: {e}") from e


def build_16_channel_vae(state: dict, scaling_factor: float, shift_factor: float, wrong_channels):
    """AutoencoderKL from LDM VAE tensors, config from shapes with this latent scale and shift (FLUX's AE, SD3's VAE);
    other than 16 latent channels -> UserError(wrong_channels(channels))."""
    from diffusers import AutoencoderKL

    from library.models import sd_ldm_layout as layout

    config = {**layout.infer_vae_config(state), "scaling_factor": scaling_factor, "shift_factor": shift_factor}
    if config["latent_channels"] != 16:
        raise UserError(wrong_channels(config["latent_channels"]))
    with tempfile.TemporaryDirectory() as folder:
        return from_single_file_with_config(AutoencoderKL, state, config, folder, "vae")


def load_flux_ae(path: str, dtype=None):
    """AutoencoderKL from a BFL ae.safetensors (LDM keys, optionally under first_stage_model./vae.)."""
    from library.models import sd_ldm_layout as layout

    state = read_safetensors_file(path, "--ae")
    for prefix in (layout.VAE_PREFIX, "vae."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "encoder.conv_in.weight" not in state or not any(k.startswith("encoder.down.") for k in state):
        raise UserError(f"--ae {path} holds no autoencoder in BFL/LDM layout (encoder.down.*)")
    vae = build_16_channel_vae(state, FLUX_AE_SCALING_FACTOR, FLUX_AE_SHIFT_FACTOR,
                               lambda channels: f"--ae {path} has {channels} latent channels; "
                                                "FLUX.1 uses the 16-channel AE")
    if any(p.is_meta for p in vae.parameters()):
        raise UserError(f"--ae {path} is missing autoencoder weights; the file is incomplete")
    return vae.to(dtype) if dtype is not None else vae


def load_clip_l(path: str, dtype=None):
    """transformers CLIPTextModel from clip_l.safetensors (`text_model.*` keys, with or without prefix)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models import sd_ldm_layout as layout

    state = strip_prefix(read_safetensors_file(path, "--clip_l"), ("text_encoders.clip_l.transformer.", "text_model."))
    state = {k.removeprefix("text_model."): v for k, v in state.items()
             if not k.startswith(("text_projection", "logit_scale"))}
    if "embeddings.token_embedding.weight" not in state:
        raise UserError(f"--clip_l {path} holds no CLIP text encoder (text_model.embeddings.*)")
    model = CLIPTextModel(CLIPTextConfig(**layout.infer_clip_config(state)))
    prefix = "text_model." if hasattr(model, "text_model") else ""  # transformers 5 flattened CLIPTextModel
    load_exactly(model, {prefix + k: v.to(torch.float32) for k, v in state.items()}, f"--clip_l {path}")
    return model.to(dtype) if dtype is not None else model


def infer_t5_config(state: dict) -> dict:
    """T5Config for an encoder-only T5 (v1.1 / FLUX / SD3 layout) from its tensor shapes."""
    bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = bias.shape[1]
    query = state["encoder.block.0.layer.0.SelfAttention.q.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    return {
        "vocab_size": state["shared.weight"].shape[0], "d_model": query.shape[1], "d_kv": query.shape[0] // heads,
        "d_ff": wi.shape[0], "num_layers": len(block_indices(state, "encoder.block")), "num_heads": heads,
        "relative_attention_num_buckets": bias.shape[0],
        # not in the shapes: T5 v1.1 has 32 buckets over distance 128; tiny presets keep that 1:4 ratio
        "relative_attention_max_distance": 4 * bias.shape[0],
        "feed_forward_proj": "gated-gelu" if gated else "relu", "dropout_rate": 0.0,
        "is_encoder_decoder": False, "use_cache": False, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def load_t5xxl(path: str, dtype=None):
    """transformers T5EncoderModel from t5xxl_fp16/bf16/fp8 files; fp8 is upcast to dtype (default fp32)."""
    state = strip_prefix(read_safetensors_file(path, "--t5xxl"), ("text_encoders.t5xxl.transformer.",))
    if "encoder.embed_tokens.weight" in state and "shared.weight" not in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    return build_t5_encoder(state, f"--t5xxl {path}", dtype)


def build_t5_encoder(state: dict, source: str, dtype=None, tensors_source: Optional[str] = None):
    """T5EncoderModel (config from shapes) holding `state`'s tensors cast to dtype (default fp32), built on the meta
    device; `source` names the file in errors, `tensors_source` (default `source`) a missing or unexpected tensor's."""
    import torch
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    if "shared.weight" not in state or "encoder.block.0.layer.0.SelfAttention.q.weight" not in state:
        raise UserError(f"{source} holds no T5 encoder (shared.weight, encoder.block.*)")
    with init_empty_weights():
        model = T5EncoderModel(T5Config(**infer_t5_config(state)))
    target = dtype or torch.float32
    state = {k: v.to(target) for k, v in state.items()}
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    load_exactly(model, state, tensors_source or source, assign=True)
    model.tie_weights()
    return model


# ---- writers ----------------------------------------------------------------------------------------

def save_flux_transformer_bfl(transformer, path: str, dtype=None, metadata: Optional[dict] = None,
                              with_prefix: bool = False) -> str:
    """The transformer as a BFL-layout file (what ComfyUI and sd-scripts load as flux1-*.safetensors)."""
    tensors = diffusers_to_bfl(cpu_state_dict(transformer.state_dict(), dtype))
    if with_prefix:
        tensors = {BFL_PREFIX + k: v for k, v in tensors.items()}
    save_safetensors_atomic(tensors, path, metadata)
    return path


def save_flux_transformer_folder(transformer, path: str, dtype=None) -> str:
    """The transformer as a diffusers model folder (config.json + weights; FluxTransformer2DModel.from_pretrained)."""
    import os

    from safetensors.torch import save_file

    from library.atomic_io import replace_folder_atomically

    weights = {k: v.contiguous() for k, v in cpu_state_dict(transformer.state_dict(), dtype).items()}

    def write(folder: str) -> None:
        transformer.save_config(folder)
        save_file(weights, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    replace_folder_atomically(path, write)
    return path


def save_flux_ae(vae, path: str, dtype=None) -> str:
    from library.models import sd_ldm_layout as layout

    save_safetensors_atomic(layout.convert_vae_to_ldm(cpu_state_dict(vae.state_dict(), dtype), vae.config), path)
    return path


def save_clip_l(text_encoder, path: str, dtype=None) -> str:
    state = cpu_state_dict(text_encoder.state_dict(), dtype)
    state = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items() if "position_ids" not in k}
    save_safetensors_atomic(state, path)
    return path


def save_t5xxl(text_encoder, path: str, dtype=None) -> str:
    state = cpu_state_dict(text_encoder.state_dict(), dtype)
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight, as in the released files
    save_safetensors_atomic({k: v.contiguous() for k, v in state.items()}, path)
    return path


# ---- everything --pretrained_model_name_or_path, --clip_l, --t5xxl and --ae point at ----------------

@dataclass
class FluxModels:
    transformer: Any
    vae: Any
    clip_l: Any
    t5xxl: Any
    clip_tokenizer: Any
    t5_tokenizer: Any
    is_schnell: bool


def load_flux_models(source: str, clip_l: Optional[str] = None, t5xxl: Optional[str] = None, ae: Optional[str] = None,
                     t5_tokenizer: Optional[str] = None, dtype=None, keep_fp8: bool = False,
                     with_vae: bool = True) -> FluxModels:
    """A BFL transformer file plus --clip_l/--t5xxl/--ae files, or a diffusers FLUX folder or hub id
    (whose parts those flags replace). Weights load in `dtype`; an fp8 transformer file stays fp8 with
    keep_fp8 (--fp8_base). with_vae=False reads no AE (and needs no --ae): models.vae is None."""
    import torch

    from library.models.clip_tokenizer import build_clip_tokenizer
    from library.models.t5_tokenizer import load_t5_tokenizer

    if os.path.isfile(source):
        needed = (("--clip_l", clip_l), ("--t5xxl", t5xxl)) + ((("--ae", ae),) if with_vae else ())
        missing = [flag for flag, value in needed if not value]
        if missing:
            raise UserError(f"{source} is a single transformer file: also pass {', '.join(missing)} "
                            "(clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors)")
        transformer, is_schnell = load_flux_transformer(source)
        if not (keep_fp8 and transformer.dtype == torch.float8_e4m3fn):
            transformer = transformer.to(dtype or torch.float32)
        parts = {"vae": None, "clip_l": None, "t5xxl": None, "clip_tokenizer": build_clip_tokenizer()}
        folder = None
    else:
        transformer, parts = _load_pipeline_parts(source, dtype, load=(with_vae and not ae, not clip_l, not t5xxl))
        is_schnell = not transformer.config.guidance_embeds
        folder = source if os.path.isdir(source) else None
    vae = (load_flux_ae(ae, dtype) if ae else parts["vae"]) if with_vae else None
    clip = load_clip_l(clip_l, dtype) if clip_l else parts["clip_l"]
    t5 = load_t5xxl(t5xxl, dtype) if t5xxl else parts["t5xxl"]
    tokenizer_2 = parts.get("t5_tokenizer") if not t5_tokenizer else None
    tokenizer_2 = tokenizer_2 or load_t5_tokenizer(t5_tokenizer, folder)
    return FluxModels(transformer, vae, clip, t5, parts["clip_tokenizer"], tokenizer_2, is_schnell)


def _load_pipeline_parts(source: str, dtype, load: tuple[bool, bool, bool]):
    """Transformer and (where `load` says so) AE, CLIP-L, T5 and tokenizers of a diffusers folder / hub id."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

    from library.models.clip_tokenizer import build_clip_tokenizer
    from library.models.hub_cache import cached_snapshot, hub_is_offline

    if not os.path.isdir(source) and not detect.looks_like_local_path(source) and hub_is_offline():
        source = cached_snapshot(source, f"FLUX model {source}", "pass local files, or go online once to download it")
    local = os.path.isdir(source)
    if local:
        detect.check_diffusers_folder_family(
            source, "flux", "pass a FLUX diffusers folder or a flux1-*.safetensors transformer file")
    elif detect.looks_like_local_path(source):
        raise UserError(f"--pretrained_model_name_or_path {source}: no such file or folder")
    dtype = dtype or torch.float32
    common = {"local_files_only": local}
    try:
        transformer = FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype, **common)
        load_vae, load_clip, load_t5 = load
        parts = {
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **common) if load_vae else None,
            "clip_l": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **common)
            if load_clip else None,
            "t5xxl": T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype, **common)
            if load_t5 else None,
        }
        has_clip_tokenizer = not local or os.path.isdir(os.path.join(source, "tokenizer"))
        parts["clip_tokenizer"] = (CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
                                   if has_clip_tokenizer else build_clip_tokenizer())
        if not local:
            from transformers import T5TokenizerFast

            parts["t5_tokenizer"] = T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_2")
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the FLUX diffusers model {source}: {e}") from e
    return transformer, parts
