"""Lumina Image 2.0 weights in the files users bring (original single file, Gemma-2 file, FLUX AE) and back.

Our own converter: diffusers' single-file Lumina 2 converter hard-codes the real widths (q 2304,
k/v 768), so tiny test models cannot use it; here every width comes from tensor shapes.
- Transformer: the original Alpha-VLLM / sd-scripts NextDiT layout (`layers.N.attention.qkv`,
  `feed_forward.w1`, `adaLN_modulation.1`, `cap_embedder.1`, `t_embedder.mlp.0`, `final_layer.*`),
  with or without ComfyUI's `model.diffusion_model.` prefix, or diffusers names. The fused qkv splits
  into diffusers' to_q/to_k/to_v by rows (q = hidden width, k = v = the rest halved: grouped-query
  attention). The original's unused `norm_final.weight` is dropped on loading and written as ones.
  `LINEAR_MAP` is the one table of original <-> diffusers linears; LoRA names reuse it.
- Gemma-2 (`--gemma2`, transformers Gemma2Model keys, optionally under `model.`): config from shapes
  with Gemma-2's head_dim 256 (a `gemma2_config` JSON in the file's metadata overrides, for tiny models).
- AE (`--ae`): the 16-channel FLUX AE (library/models/flux_checkpoint.py's loader).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from library.atomic_io import save_safetensors_atomic
from library.errors import UserError
from library.models import checkpoint_detect as detect

ORIGINAL_PREFIX = "model.diffusion_model."
PATCH_SIZE = 2  # every released Lumina 2 model
BLOCK_LISTS = ("layers", "noise_refiner", "context_refiner")
# original linear inside a block -> the diffusers linears it holds, in row order
BLOCK_LINEARS = {
    "attention.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attention.out": ("attn.to_out.0",),
    "feed_forward.w1": ("feed_forward.linear_1",),
    "feed_forward.w2": ("feed_forward.linear_2",),
    "feed_forward.w3": ("feed_forward.linear_3",),
    "adaLN_modulation.1": ("norm1.linear",),  # layers and noise_refiner only
}
BLOCK_NORMS = {"attention.q_norm": "attn.norm_q", "attention.k_norm": "attn.norm_k", "attention_norm2": "norm2",
               "ffn_norm1": "ffn_norm1", "ffn_norm2": "ffn_norm2"}  # + attention_norm1, see _norm1_name
GLOBAL_LINEARS = {
    "x_embedder": "x_embedder",
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",
    "final_layer.linear": "norm_out.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",
}
GLOBAL_NORMS = {"cap_embedder.0": "time_caption_embed.caption_embedder.0"}
UNUSED_ORIGINAL = "norm_final.weight"
GEMMA2_CONFIG_KEY = "gemma2_config"
GEMMA2_HEAD_DIM = 256


def lumina_sampling_scheduler():
    """The scheduler Lumina-Image-2.0 ships: flow-matching Euler with shift 6."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)


# ---- names ------------------------------------------------------------------------------------------

def _norm1_name(block_list: str) -> str:
    return "norm1" if block_list == "context_refiner" else "norm1.norm"  # the unmodulated refiner has no norm1.linear


def diffusers_to_original_module(path: str) -> Optional[str]:
    """Original name of the linear a diffusers module path belongs to ("layers.0.attn.to_k" ->
    "layers.0.attention.qkv"); None for modules the original has not as a linear."""
    match = re.fullmatch(rf"({'|'.join(BLOCK_LISTS)})\.(\d+)\.(.+)", path)
    if match:
        block_list, index, rest = match.groups()
        name = next((original for original, members in BLOCK_LINEARS.items() if rest in members), None)
        return f"{block_list}.{index}.{name}" if name else None
    return next((original for original, diffusers in GLOBAL_LINEARS.items() if diffusers == path), None)


def _block_indices(keys, prefix: str) -> list[int]:
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def qkv_row_sizes(rows: int, hidden: int) -> list[int]:
    """(q, k, v) rows of a fused qkv: q is the model width, k and v share the rest (grouped-query attention)."""
    if rows <= hidden or (rows - hidden) % 2:
        raise UserError(f"a Lumina 2 qkv with {rows} rows cannot belong to a model {hidden} wide")
    return [hidden, (rows - hidden) // 2, (rows - hidden) // 2]


# ---- transformer: original <-> diffusers -------------------------------------------------------------

def original_to_diffusers(state: dict, source: str = "the checkpoint") -> dict:
    """Original NextDiT tensors (prefix removed) -> diffusers names; qkv splits are views."""
    state = dict(state)
    state.pop(UNUSED_ORIGINAL, None)
    if "x_embedder.weight" not in state:
        raise UserError(f"{source} does not look like a Lumina 2 transformer (no x_embedder weights)")
    hidden = state["x_embedder.weight"].shape[0]
    out = {}

    def take(key):
        if key not in state:
            raise UserError(f"{source} is missing the Lumina 2 tensor {key}; the file is incomplete")
        return state.pop(key)

    for block_list in BLOCK_LISTS:
        for i in _block_indices(state, block_list):
            prefix = f"{block_list}.{i}."
            for original, members in BLOCK_LINEARS.items():
                for kind in ("weight", "bias"):
                    key = f"{prefix}{original}.{kind}"
                    if key not in state:
                        continue
                    tensor = state.pop(key)
                    sizes = qkv_row_sizes(tensor.shape[0], hidden) if len(members) > 1 else [tensor.shape[0]]
                    for member, part in zip(members, tensor.split(sizes, dim=0)):
                        out[f"{prefix}{member}.{kind}"] = part
            for original, diffusers in {**BLOCK_NORMS, "attention_norm1": _norm1_name(block_list)}.items():
                out[f"{prefix}{diffusers}.weight"] = take(f"{prefix}{original}.weight")
    for table in (GLOBAL_LINEARS, GLOBAL_NORMS):
        for original, diffusers in table.items():
            for kind in ("weight", "bias"):
                if f"{original}.{kind}" in state:
                    out[f"{diffusers}.{kind}"] = state.pop(f"{original}.{kind}")
    if state:
        raise UserError(f"{source}: unexpected tensor {sorted(state)[0]}; not a Lumina 2 transformer")
    return out


def diffusers_to_original(state: dict) -> dict:
    """Inverse of original_to_diffusers (writes norm_final.weight as ones, as the released files hold it)."""
    import torch

    out = {}
    for block_list in BLOCK_LISTS:
        for i in _block_indices(state, block_list):
            prefix = f"{block_list}.{i}."
            for original, members in BLOCK_LINEARS.items():
                for kind in ("weight", "bias"):
                    parts = [state.get(f"{prefix}{member}.{kind}") for member in members]
                    if parts[0] is not None:
                        out[f"{prefix}{original}.{kind}"] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            for original, diffusers in {**BLOCK_NORMS, "attention_norm1": _norm1_name(block_list)}.items():
                out[f"{prefix}{original}.weight"] = state[f"{prefix}{diffusers}.weight"]
    for table in (GLOBAL_LINEARS, GLOBAL_NORMS):
        for original, diffusers in table.items():
            for kind in ("weight", "bias"):
                if f"{diffusers}.{kind}" in state:
                    out[f"{original}.{kind}"] = state[f"{diffusers}.{kind}"]
    width = state["x_embedder.weight"]
    out[UNUSED_ORIGINAL] = torch.ones(width.shape[0], dtype=width.dtype)
    return out


def rope_axes_for_head_dim(head_dim: int) -> tuple[int, int, int]:
    """Lumina 2 splits each 96-wide head into equal rotary thirds (32, 32, 32); heads that cannot split
    into even thirds use FLUX's rule (16 -> (4, 6, 6), the tiny test model's)."""
    from library.models.flux_checkpoint import rope_axes_for_head_dim as flux_rule

    if head_dim % 6 == 0:
        return (head_dim // 3,) * 3
    return flux_rule(head_dim)


def _feed_forward_config(inner: int, hidden: int, source: str) -> dict:
    """multiple_of / ffn_dim_multiplier giving diffusers' LuminaFeedForward an `inner` hidden width."""
    if inner >= 4 * hidden:
        return {"multiple_of": inner, "ffn_dim_multiplier": None}
    multiplier = inner / (4 * hidden)
    if int(multiplier * 4 * hidden) != inner:
        raise UserError(f"{source}: feed-forward width {inner} cannot be expressed for a {hidden}-wide model")
    return {"multiple_of": 1, "ffn_dim_multiplier": multiplier}


def infer_transformer_config(state: dict, source: str = "the checkpoint") -> dict:
    """Lumina2Transformer2DModel config from diffusers-named tensors."""
    hidden, patch_in = state["x_embedder.weight"].shape
    if "layers.0.attn.norm_q.weight" not in state:
        raise UserError(f"{source} has no transformer layers; it is not a complete Lumina 2 transformer")
    head_dim = int(state["layers.0.attn.norm_q.weight"].shape[0])
    return {
        "_class_name": "Lumina2Transformer2DModel", "sample_size": 128, "patch_size": PATCH_SIZE,
        "in_channels": int(patch_in) // PATCH_SIZE**2, "out_channels": None, "hidden_size": int(hidden),
        "num_layers": len(_block_indices(state, "layers")),
        "num_refiner_layers": len(_block_indices(state, "noise_refiner")),
        "num_attention_heads": int(hidden) // head_dim,
        "num_kv_heads": int(state["layers.0.attn.to_k.weight"].shape[0]) // head_dim,
        **_feed_forward_config(int(state["layers.0.feed_forward.linear_1.weight"].shape[0]), int(hidden), source),
        "norm_eps": 1e-5, "scaling_factor": 1.0, "axes_dim_rope": list(rope_axes_for_head_dim(head_dim)),
        "axes_lens": [300, 512, 512], "cap_feat_dim": int(state["time_caption_embed.caption_embedder.1.weight"].shape[1]),
    }


def transformer_state_from_file(state: dict, source: str) -> dict:
    if any(k.startswith(ORIGINAL_PREFIX) for k in state):
        state = {k[len(ORIGINAL_PREFIX):]: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)}
    if "cap_embedder.1.weight" in state:
        return original_to_diffusers(state, source)
    if "time_caption_embed.caption_embedder.1.weight" in state:
        return state
    raise UserError(f"{source} does not look like a Lumina 2 transformer (no cap_embedder weights)")


def build_transformer(state: dict, config: dict, dtype=None, source: str = "the checkpoint"):
    """Lumina2Transformer2DModel holding `state`'s tensors (cast to dtype), without a second copy."""
    from accelerate import init_empty_weights
    from diffusers import Lumina2Transformer2DModel

    with init_empty_weights():
        model = Lumina2Transformer2DModel.from_config({k: v for k, v in config.items() if k != "_class_name"})
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise UserError(f"{source}: {'missing' if missing else 'unexpected'} transformer tensor {name}; "
                        "the file is incomplete or not a Lumina 2 transformer")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model


def load_lumina_transformer(path: str, dtype=None):
    from library.models.flux_checkpoint import read_safetensors_file

    state = read_safetensors_file(path, "--pretrained_model_name_or_path")
    detect.check_checkpoint_family(path, state.keys(), {"lumina"})
    diffusers_state = transformer_state_from_file(state, path)
    return build_transformer(diffusers_state, infer_transformer_config(diffusers_state, path), dtype, path)


def save_lumina_transformer_original(transformer, path: str, dtype=None, metadata: Optional[dict] = None,
                                     with_prefix: bool = False) -> str:
    """The transformer as an original-layout file (what sd-scripts and ComfyUI load)."""
    from library.models.weights_io import cpu_state_dict

    tensors = diffusers_to_original(cpu_state_dict(transformer.state_dict(), dtype))
    if with_prefix:
        tensors = {ORIGINAL_PREFIX + k: v for k, v in tensors.items()}
    save_safetensors_atomic({k: v.contiguous() for k, v in tensors.items()}, path, metadata)
    return path


# ---- Gemma-2 ----------------------------------------------------------------------------------------

def infer_gemma2_config(state: dict, metadata: dict) -> dict:
    if GEMMA2_CONFIG_KEY in metadata:
        return json.loads(metadata[GEMMA2_CONFIG_KEY])
    vocab, hidden = state["embed_tokens.weight"].shape
    head_dim = GEMMA2_HEAD_DIM
    return {
        "vocab_size": int(vocab), "hidden_size": int(hidden), "head_dim": head_dim,
        "intermediate_size": int(state["layers.0.mlp.gate_proj.weight"].shape[0]),
        "num_hidden_layers": len(_block_indices(state, "layers")),
        "num_attention_heads": int(state["layers.0.self_attn.q_proj.weight"].shape[0]) // head_dim,
        "num_key_value_heads": int(state["layers.0.self_attn.k_proj.weight"].shape[0]) // head_dim,
        "query_pre_attn_scalar": head_dim, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    }


def load_gemma2(path: str, dtype=None):
    """transformers Gemma2Model from --gemma2 (Gemma2Model keys, optionally under `model.`)."""
    import torch
    from safetensors import safe_open
    from transformers import Gemma2Config, Gemma2Model

    from library.models.flux_checkpoint import read_safetensors_file
    from library.models.weights_io import load_exactly, strip_prefix

    state = strip_prefix(read_safetensors_file(path, "--gemma2"), ("model.",))
    state.pop("lm_head.weight", None)
    if "embed_tokens.weight" not in state or "layers.0.mlp.gate_proj.weight" not in state:
        raise UserError(f"--gemma2 {path} holds no Gemma-2 model (embed_tokens.*, layers.N.mlp.*)")
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata() or {})
    model = Gemma2Model(Gemma2Config(**infer_gemma2_config(state, metadata)))
    load_exactly(model, {k: v.to(torch.float32) for k, v in state.items()}, f"--gemma2 {path}")
    return model.to(dtype) if dtype is not None else model


def save_gemma2(text_encoder, path: str, dtype=None) -> str:
    """Gemma2Model keys under `model.` with its config in the metadata (tiny models need it)."""
    from library.models.weights_io import cpu_state_dict

    state = {f"model.{k}": v.contiguous() for k, v in cpu_state_dict(text_encoder.state_dict(), dtype).items()}
    keep = ("vocab_size", "hidden_size", "head_dim", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "query_pre_attn_scalar", "sliding_window", "max_position_embeddings",
            "pad_token_id", "eos_token_id", "bos_token_id")
    config = {k: getattr(text_encoder.config, k) for k in keep}
    save_safetensors_atomic(state, path, {GEMMA2_CONFIG_KEY: json.dumps(config)})
    return path


# ---- everything the model flags point at -------------------------------------------------------------

@dataclass
class LuminaModels:
    transformer: Any
    vae: Any
    gemma2: Any
    tokenizer: Any


def load_lumina_models(source: str, gemma2: Optional[str] = None, ae: Optional[str] = None,
                       tokenizer: Optional[str] = None, dtype=None, with_vae: bool = True) -> LuminaModels:
    """An original transformer file plus --gemma2/--ae files, or a diffusers Lumina 2 folder (whose
    parts those flags replace). with_vae=False reads no AE (and needs no --ae): models.vae is None."""
    import torch

    from library.models.flux_checkpoint import load_flux_ae
    from library.models.gemma_tokenizer import load_gemma_tokenizer

    dtype = dtype or torch.float32
    if os.path.isfile(source):
        needed = (("--gemma2", gemma2),) + ((("--ae", ae),) if with_vae else ())
        missing = [flag for flag, value in needed if not value]
        if missing:
            raise UserError(f"{source} is a single transformer file: also pass {', '.join(missing)} "
                            "(gemma_2_2b.safetensors, ae.safetensors)")
        transformer, parts, folder = load_lumina_transformer(source, dtype), {}, None
    else:
        transformer, parts = _load_pipeline_parts(source, dtype, load_vae=with_vae and not ae, load_gemma=not gemma2)
        folder = source
    vae = (load_flux_ae(ae, dtype) if ae else parts["vae"]) if with_vae else None
    text_encoder = load_gemma2(gemma2, dtype) if gemma2 else parts["gemma2"]
    return LuminaModels(transformer, vae, text_encoder, load_gemma_tokenizer(tokenizer, folder))


def _load_pipeline_parts(source: str, dtype, load_vae: bool, load_gemma: bool):
    from diffusers import AutoencoderKL, Lumina2Transformer2DModel
    from transformers import Gemma2Model

    from library.families.table import family_of_pipeline_class

    if not os.path.isdir(source):
        raise UserError(f"--pretrained_model_name_or_path {source}: no such file or folder (pass the original "
                        "Lumina 2 .safetensors file or a diffusers Lumina2Pipeline folder)")
    index = os.path.join(source, "model_index.json")
    if not os.path.isfile(index):
        raise UserError(f"{source} is a folder but not a diffusers model (no model_index.json)")
    with open(index, encoding="utf-8") as f:
        family = family_of_pipeline_class(json.load(f).get("_class_name", "")) or "unknown"
    if family != "lumina":
        raise detect.wrong_family_error(source, family)
    common = {"local_files_only": True}
    try:
        transformer = Lumina2Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype,
                                                                **common)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **common) if load_vae else None
        gemma = Gemma2Model.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **common) if load_gemma else None
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the Lumina 2 diffusers model {source}: {e}") from e
    return transformer, {"vae": vae, "gemma2": gemma}
