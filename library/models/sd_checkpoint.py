"""Loading and saving Stable Diffusion 1.x/2.x weights in every form users bring or expect.

Sources (`load_sd_models`): a diffusers folder (`from_pretrained`, local files only), a hub id (only
when online), or a single LDM file (.safetensors, or .ckpt/.pt through `torch.load(weights_only=True)`).
Single files are read once, their family checked (a FLUX/SDXL/... file is refused naming the right
script), their configs inferred from tensor shapes (library/models/sd_ldm_layout.py) and written to a
temporary config folder, and each part converted by diffusers' own single-file loaders
(`from_single_file(state_dict, config=<folder>)`, `create_diffusers_clip_model_from_ldm`) - the same
calls `StableDiffusionPipeline.from_single_file(path, config=...)` makes, without reading twice.
Outputs: `save_sd_single_file` (one LDM-layout .safetensors, atomic), `save_sd_diffusers_folder` (a
complete pipeline folder written aside and renamed into place), `build_sd_pipeline` for sampling.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from library.atomic_io import replace_folder_atomically, save_safetensors_atomic
from library.errors import UserError
from library.families.table import family_of_pipeline_class
from library.models.hub_cache import cached_snapshot, hub_errors, hub_is_offline
from library.models import checkpoint_detect as detect
from library.models import sd_ldm_layout as layout
from library.models.weights_io import (
    assert_fully_loaded, cast_tensor, read_state_dict, write_json,
)

SD_BETA_START, SD_BETA_END, SD_TRAIN_TIMESTEPS = 0.00085, 0.012, 1000


@dataclass
class SDModels:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    v2: bool  # OpenCLIP-H text encoder (SD 2.x)


def is_open_clip_text_encoder(text_encoder) -> bool:
    """SD 2.x's OpenCLIP-H uses GELU; OpenAI's CLIP-L of SD 1.x uses quick GELU."""
    return text_encoder.config.hidden_act == "gelu"


def sd_noise_scheduler(v_parameterization: bool):
    """The training DDPM schedule every SD 1.x/2.x model was trained with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=SD_TRAIN_TIMESTEPS, beta_start=SD_BETA_START, beta_end=SD_BETA_END,
        beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def sd_tokenizer(v2: bool):
    """CLIP BPE tokenizer; SD 2.x's copy pads with "!" (id 0) instead of <|endoftext|>."""
    from library.models.clip_tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(pad_token="!" if v2 else "<|endoftext|>")


# ---- loading ---------------------------------------------------------------------------------------

def _load_vae_from_ldm(state: dict, source: str):
    from diffusers import AutoencoderKL

    ldm_vae = layout.split_ldm_state_dict(state)["vae"] or state  # bare VAE files have no prefix
    with tempfile.TemporaryDirectory() as config_dir:
        write_json(os.path.join(config_dir, "vae", "config.json"), layout.infer_vae_config(ldm_vae))
        vae = AutoencoderKL.from_single_file(state, config=config_dir, subfolder="vae", local_files_only=True)
    assert_fully_loaded(vae, "VAE", source)
    return vae.float()


def _load_ldm_text_encoder(state: dict, parts: dict, v2: bool, config_dir: str, source: str):
    import torch
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    config = layout.infer_open_clip_config(parts["open_clip"]) if v2 else layout.infer_clip_config(parts["clip"])
    write_json(os.path.join(config_dir, "text_encoder", "config.json"), config)
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, state, subfolder="text_encoder", config=config_dir, local_files_only=True,
        torch_dtype=torch.float32,
    )
    assert_fully_loaded(text_encoder, "text encoder", source)
    return text_encoder


def load_sd_single_file(path: str, load_vae: bool = True, full_finetune: bool = False) -> SDModels:
    """UNet, VAE (unless load_vae is False) and text encoder from one LDM-layout file (float32)."""
    from diffusers import UNet2DConditionModel

    state = read_state_dict(path)
    detect.check_checkpoint_family(path, state.keys(), {"sd", "sd2"}, full_finetune)
    parts = layout.split_ldm_state_dict(state)
    v2 = bool(parts["open_clip"])
    if "input_blocks.0.0.weight" not in parts["unet"]:
        raise UserError(f"{path} has no UNet weights (model.diffusion_model.*); pass a full SD checkpoint")
    if not v2 and not parts["clip"]:
        raise UserError(f"{path} has no text encoder weights (cond_stage_model.*); pass a full SD checkpoint")
    if load_vae and not parts["vae"]:
        raise UserError(f"{path} has no VAE weights (first_stage_model.*); add --vae with a VAE file or folder")
    with tempfile.TemporaryDirectory() as config_dir:
        write_json(os.path.join(config_dir, "unet", "config.json"), layout.infer_unet_config(parts["unet"], v2))
        # loaded in the file's dtype, then .float(): diffusers warns on every .to(dtype)
        unet = UNet2DConditionModel.from_single_file(state, config=config_dir, subfolder="unet", local_files_only=True)
        assert_fully_loaded(unet, "UNet", path)
        text_encoder = _load_ldm_text_encoder(state, parts, v2, config_dir, path)
    vae = _load_vae_from_ldm(state, path) if load_vae else None
    return SDModels(unet.float(), vae, text_encoder, sd_tokenizer(v2), v2)


def _check_folder_family(folder: str, full_finetune: bool) -> None:
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        if not os.path.isdir(os.path.join(folder, "unet")):
            raise UserError(
                f"{folder} is a folder but not a diffusers model (no model_index.json or unet/); "
                "pass a diffusers model folder or a single .safetensors checkpoint"
            )
        return
    with open(index_path, encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name", "")
    family = family_of_pipeline_class(class_name) or "sd"
    if family != "sd":
        raise detect.wrong_family_error(folder, family, full_finetune)


def _load_diffusers_parts(source: str, local_only: bool, load_vae: bool) -> SDModels:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"local_files_only": local_only}
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32, **common)
    vae = None
    if load_vae:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **common)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32, **common)
    v2 = is_open_clip_text_encoder(text_encoder)
    if not local_only or os.path.isdir(os.path.join(source, "tokenizer")):
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
    else:
        tokenizer = sd_tokenizer(v2)
    return SDModels(unet, vae, text_encoder, tokenizer, v2)


def load_sd_diffusers_folder(folder: str, load_vae: bool = True, full_finetune: bool = False) -> SDModels:
    _check_folder_family(folder, full_finetune)
    try:
        return _load_diffusers_parts(folder, local_only=True, load_vae=load_vae)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the diffusers model in {folder}: {e}") from e


OFFLINE_FIX = "pass a local .safetensors file or diffusers folder, or go online once to download it"


def load_sd_from_hub(repo_id: str, load_vae: bool = True) -> SDModels:
    if hub_is_offline():
        return load_sd_diffusers_folder(cached_snapshot(repo_id, f"model {repo_id}", OFFLINE_FIX), load_vae)
    try:
        return _load_diffusers_parts(repo_id, local_only=False, load_vae=load_vae)
    except hub_errors() as e:
        raise UserError(
            f"{repo_id} is not a local file or folder, and downloading it from the model hub failed "
            f"({type(e).__name__}: {e}); check the name and your network, or pass a local file"
        ) from e


def load_vae(source: str):
    """--vae: an LDM VAE file (with or without `first_stage_model.`), a diffusers folder, or a hub id."""
    import torch
    from diffusers import AutoencoderKL

    if os.path.isdir(source):
        subfolder = "vae" if os.path.isfile(os.path.join(source, "vae", "config.json")) else None
        if not os.path.isfile(os.path.join(source, subfolder or "", "config.json")):
            raise UserError(f"--vae {source}: the folder has no config.json (nor vae/config.json)")
        return AutoencoderKL.from_pretrained(
            source, subfolder=subfolder, local_files_only=True, torch_dtype=torch.float32
        )
    if os.path.isfile(source):
        state = read_state_dict(source)
        if any(k.startswith("encoder.down_blocks.") for k in state):
            raise UserError(f"--vae {source} is in diffusers layout; pass the folder holding it and its config.json")
        if not any("encoder.down." in k for k in state):
            raise UserError(f"--vae {source} holds no VAE weights (expected encoder.down.* / first_stage_model.*)")
        return _load_vae_from_ldm(state, source)
    if detect.looks_like_local_path(source):
        raise UserError(f"--vae {source}: no such file or folder")
    if hub_is_offline():
        return load_vae(cached_snapshot(source, f"VAE {source}", OFFLINE_FIX))
    try:
        return AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32)
    except hub_errors() as e:
        raise UserError(f"--vae {source}: not a local file or folder, and the hub download failed ({e})") from e


def load_sd_models(
    source: str, vae_source: Optional[str] = None, full_finetune: bool = False, with_vae: bool = True
) -> SDModels:
    """Everything --pretrained_model_name_or_path (and --vae) can point at; user mistakes -> UserError.

    with_vae=False reads no VAE (models.vae is None): the latents all come from cache files."""
    load_own_vae = with_vae and vae_source is None
    if os.path.isdir(source):
        models = load_sd_diffusers_folder(source, load_own_vae, full_finetune)
    elif os.path.isfile(source):
        if not detect.is_single_file_name(source):
            raise UserError(f"{source}: unsupported checkpoint type; use .safetensors (or .ckpt/.pt)")
        models = load_sd_single_file(source, load_own_vae, full_finetune)
    elif detect.looks_like_local_path(source):
        raise UserError(f"--pretrained_model_name_or_path {source}: no such file or folder")
    else:
        models = load_sd_from_hub(source, load_own_vae)
    if with_vae and vae_source is not None:
        models.vae = load_vae(vae_source)
    return models


# ---- saving ----------------------------------------------------------------------------------------

def save_sd_single_file(
    unet, vae, text_encoder, path: str, v2: Optional[bool] = None, dtype=None, metadata: Optional[dict] = None
) -> None:
    """One LDM-layout .safetensors that A1111, ComfyUI and diffusers' from_single_file load."""
    if v2 is None:
        v2 = is_open_clip_text_encoder(text_encoder)
    state = layout.diffusers_to_ldm(unet, vae, text_encoder, v2)
    tensors = {k: cast_tensor(v, dtype) for k, v in state.items()}
    save_safetensors_atomic(tensors, path, {k: str(v) for k, v in (metadata or {}).items()})


def save_sd15_single_file(pipeline_or_components, path: str, dtype=None, metadata: Optional[dict] = None) -> str:
    """Single-file checkpoint from a StableDiffusionPipeline or ModelComponents (tests' fixtures too)."""
    parts = pipeline_or_components
    if hasattr(parts, "denoiser"):  # ModelComponents
        unet, vae, text_encoder = parts.denoiser, parts.vae, parts.text_encoders[0]
    else:
        unet, vae, text_encoder = parts.unet, parts.vae, parts.text_encoder
    save_sd_single_file(unet, vae, text_encoder, path, dtype=dtype, metadata=metadata)
    return path


def build_sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    """A StableDiffusionPipeline around in-memory (possibly training) models; no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sampling_scheduler(noise_scheduler):
    """DDIM with the training betas, the scheduler SD folders ship for inference."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False, steps_offset=1)


def write_diffusers_parts(folder: str, pipeline, dtype) -> None:
    from safetensors.torch import save_file

    pipeline.save_config(folder)  # model_index.json
    for name in ("unet", "vae"):
        model, sub = getattr(pipeline, name), os.path.join(folder, name)
        model.save_config(sub)
        weights = {k: cast_tensor(v, dtype).contiguous() for k, v in model.state_dict().items()}
        save_file(weights, os.path.join(sub, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    text_encoder = pipeline.text_encoder
    text_weights = {k: cast_tensor(v, dtype) for k, v in text_encoder.state_dict().items()}
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), state_dict=text_weights)
    pipeline.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    pipeline.scheduler.save_pretrained(os.path.join(folder, "scheduler"))


def save_sd_diffusers_folder(pipeline, path: str, dtype=None) -> None:
    """Write a complete diffusers folder aside, then swap it in; the old folder survives any failure."""
    replace_folder_atomically(path, lambda folder: write_diffusers_parts(folder, pipeline, dtype))
