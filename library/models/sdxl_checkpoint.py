"""Loading and saving SDXL weights in every form users bring or expect.

Sources (`load_sdxl_models`): an SGM single file (sd_xl_base_1.0.safetensors and fine-tunes; .ckpt
only through `torch.load(weights_only=True)`), a diffusers folder (local files only), or a hub id
(only when online). Single files are read once, their family checked (an SD 1.x/FLUX/... file is
refused naming the right script), their configs inferred from tensor shapes
(library/models/sgm_layout.py) and written to a temporary config folder, and each part converted by
diffusers' own single-file loaders - the calls `StableDiffusionXLPipeline.from_single_file(path,
config=...)` makes. A VAE given by file gets SDXL's latent scale 0.13025 (files do not record it).
Outputs: `save_sdxl_single_file` (one SGM-layout .safetensors, atomic), `save_sdxl_diffusers_folder`
(a complete pipeline folder written aside and swapped into place), `build_sdxl_pipeline`.
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
from library.models import sd_checkpoint as sd
from library.models import sgm_layout as sgm
from library.models.weights_io import (
    assert_fully_loaded, cast_tensor, read_state_dict, write_json,
)

REFINER_PIPELINE_CLASS = "StableDiffusionXLImg2ImgPipeline"
REFINER_MESSAGE = "is an SDXL refiner (OpenCLIP bigG only); train the SDXL base model instead"


@dataclass
class SDXLModels:
    unet: Any
    vae: Any
    text_encoder_1: Any  # CLIP-L, transformers CLIPTextModel
    text_encoder_2: Any  # OpenCLIP bigG, transformers CLIPTextModelWithProjection
    tokenizer_1: Any
    tokenizer_2: Any
    logit_scale: Any = None  # bigG's logit_scale from an SGM file, written back when saving
    marked_v_prediction: bool = False  # the file carries the `v_pred` marker key of v-prediction SDXL models


def sdxl_tokenizers() -> tuple:
    """CLIP-L's tokenizer (pads with <|endoftext|>) and bigG's (pads with "!", id 0)."""
    from library.models.clip_tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")


# ---- loading ---------------------------------------------------------------------------------------

def _check_sgm_parts(path: str, state: dict, parts: dict, load_vae: bool) -> None:
    if not parts["clip_l"] and "conditioner.embedders.0.model.text_projection" in state:
        raise UserError(f"{path} {REFINER_MESSAGE}")
    needed = [("unet", "input_blocks.0.0.weight", "UNet weights (model.diffusion_model.*)"),
              ("clip_l", "embeddings.token_embedding.weight", "CLIP-L weights (conditioner.embedders.0.*)"),
              ("bigg", "token_embedding.weight", "OpenCLIP bigG weights (conditioner.embedders.1.*)")]
    for part, key, what in needed:
        if key not in parts[part]:
            raise UserError(f"{path} has no {what}; pass a complete SDXL checkpoint")
    if "label_emb.0.0.weight" not in parts["unet"]:
        raise UserError(f"{path} has an SD-style UNet without SDXL's size embedding (label_emb); "
                        "use sd_train_network.py")
    if load_vae and not parts["vae"]:
        raise UserError(f"{path} has no VAE weights (first_stage_model.*); add --vae with a VAE file or folder")


def _load_sgm_text_encoders(state: dict, parts: dict, config_dir: str, source: str) -> tuple:
    import torch
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    write_json(os.path.join(config_dir, "text_encoder", "config.json"), sgm.infer_clip_l_config(parts["clip_l"]))
    write_json(os.path.join(config_dir, "text_encoder_2", "config.json"), sgm.infer_bigg_config(parts["bigg"]))
    encoders = []
    for cls, subfolder in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")):
        encoder = create_diffusers_clip_model_from_ldm(cls, state, subfolder=subfolder, config=config_dir,
                                                       local_files_only=True, torch_dtype=torch.float32)
        assert_fully_loaded(encoder, subfolder.replace("_", " "), source)
        encoders.append(encoder)
    return tuple(encoders)


def _load_sgm_vae(state: dict, ldm_vae: dict, source: str):
    from diffusers import AutoencoderKL

    with tempfile.TemporaryDirectory() as config_dir:
        write_json(os.path.join(config_dir, "vae", "config.json"), sgm.infer_sdxl_vae_config(ldm_vae))
        vae = AutoencoderKL.from_single_file(state, config=config_dir, subfolder="vae", local_files_only=True)
    assert_fully_loaded(vae, "VAE", source)
    return vae.float()


def load_sdxl_single_file(path: str, load_vae: bool = True, full_finetune: bool = False) -> SDXLModels:
    """UNet, VAE (unless load_vae is False) and both text encoders from one SGM-layout file (float32)."""
    from diffusers import UNet2DConditionModel

    state = read_state_dict(path)
    detect.check_checkpoint_family(path, state.keys(), {"sdxl"}, full_finetune)
    parts = sgm.split_sgm_state_dict(state)
    _check_sgm_parts(path, state, parts, load_vae)
    pooled_dim = parts["bigg"]["text_projection"].shape[1]
    with tempfile.TemporaryDirectory() as config_dir:
        unet_config = sgm.infer_sdxl_unet_config(parts["unet"], pooled_dim)
        write_json(os.path.join(config_dir, "unet", "config.json"), unet_config)
        unet = UNet2DConditionModel.from_single_file(state, config=config_dir, subfolder="unet", local_files_only=True)
        assert_fully_loaded(unet, "UNet", path)
        text_encoder_1, text_encoder_2 = _load_sgm_text_encoders(state, parts, config_dir, path)
    vae = _load_sgm_vae(state, parts["vae"], path) if load_vae else None
    logit_scale = parts["bigg"].get("logit_scale")
    return SDXLModels(unet.float(), vae, text_encoder_1, text_encoder_2, *sdxl_tokenizers(),
                      logit_scale=logit_scale.clone() if logit_scale is not None else None,
                      marked_v_prediction="v_pred" in state)


def _check_folder_family(folder: str, full_finetune: bool) -> None:
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise UserError(f"{folder} is a folder but not a diffusers model (no model_index.json); "
                        "pass a diffusers SDXL folder or a single .safetensors checkpoint")
    with open(index_path, encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name", "")
    if class_name == REFINER_PIPELINE_CLASS:
        raise UserError(f"{folder} {REFINER_MESSAGE}")
    family = family_of_pipeline_class(class_name)
    if family is not None and family != "sdxl":
        raise detect.wrong_family_error(folder, family, full_finetune)
    if family is None and not os.path.isdir(os.path.join(folder, "text_encoder_2")):
        raise UserError(f"{folder} holds a {class_name or 'unknown'} pipeline, not SDXL (no text_encoder_2/)")


def _load_diffusers_parts(source: str, local_only: bool, load_vae: bool) -> SDXLModels:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    common = {"local_files_only": local_only}
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32, **common)
    vae = None
    if load_vae:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **common)
    text_encoder_1 = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32, **common)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
        source, subfolder="text_encoder_2", dtype=torch.float32, **common)
    has_tokenizers = all(os.path.isdir(os.path.join(source, sub)) for sub in ("tokenizer", "tokenizer_2"))
    if not local_only or has_tokenizers:
        tokenizers = tuple(CLIPTokenizer.from_pretrained(source, subfolder=sub, **common)
                           for sub in ("tokenizer", "tokenizer_2"))
    else:
        tokenizers = sdxl_tokenizers()
    return SDXLModels(unet, vae, text_encoder_1, text_encoder_2, *tokenizers)


def load_sdxl_diffusers_folder(folder: str, load_vae: bool = True, full_finetune: bool = False) -> SDXLModels:
    _check_folder_family(folder, full_finetune)
    try:
        return _load_diffusers_parts(folder, local_only=True, load_vae=load_vae)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the diffusers SDXL model in {folder}: {e}") from e


def load_sdxl_from_hub(repo_id: str, load_vae: bool = True) -> SDXLModels:
    if hub_is_offline():
        return load_sdxl_diffusers_folder(cached_snapshot(repo_id, f"model {repo_id}", sd.OFFLINE_FIX), load_vae)
    try:
        return _load_diffusers_parts(repo_id, local_only=False, load_vae=load_vae)
    except hub_errors() as e:
        raise UserError(
            f"{repo_id} is not a local file or folder, and downloading it from the model hub failed "
            f"({type(e).__name__}: {e}); check the name and your network, or pass a local file"
        ) from e


def load_sdxl_vae(source: str):
    """--vae: a VAE file (LDM names, with or without `first_stage_model.`), diffusers folder or hub id."""
    vae = sd.load_vae(source)
    if os.path.isfile(source):
        vae.register_to_config(scaling_factor=sgm.SDXL_VAE_SCALING_FACTOR)
    return vae


def load_sdxl_vae_only(source: str):
    """The VAE alone (tools/cache_latents.py): from an SGM .safetensors only its `first_stage_model.*`
    tensors are read; anything else as --vae."""
    if not (os.path.isfile(source) and source.endswith(".safetensors")):
        return load_sdxl_vae(source)
    from safetensors import safe_open

    keys = detect.read_checkpoint_keys(source)
    detect.check_checkpoint_family(source, keys, {"sdxl"})
    vae_keys = [key for key in keys if key.startswith(sgm.VAE_PREFIX)]
    if not vae_keys:
        return load_sdxl_vae(source)  # a bare VAE file
    with safe_open(source, framework="pt") as f:
        state = {key: f.get_tensor(key) for key in vae_keys}
    return _load_sgm_vae(state, sgm.split_sgm_state_dict(state)["vae"], source)


def load_sdxl_models(
    source: str, vae_source: Optional[str] = None, full_finetune: bool = False, with_vae: bool = True
) -> SDXLModels:
    """Everything --pretrained_model_name_or_path (and --vae) can point at; user mistakes -> UserError.

    with_vae=False reads no VAE (models.vae is None): the latents all come from cache files."""
    load_own_vae = with_vae and vae_source is None
    if os.path.isdir(source):
        models = load_sdxl_diffusers_folder(source, load_own_vae, full_finetune)
    elif os.path.isfile(source):
        if not detect.is_single_file_name(source):
            raise UserError(f"{source}: unsupported checkpoint type; use .safetensors (or .ckpt/.pt)")
        models = load_sdxl_single_file(source, load_own_vae, full_finetune)
    elif detect.looks_like_local_path(source):
        raise UserError(f"--pretrained_model_name_or_path {source}: no such file or folder")
    else:
        models = load_sdxl_from_hub(source, load_own_vae)
    if with_vae and vae_source is not None:
        models.vae = load_sdxl_vae(vae_source)
    return models


# ---- saving ----------------------------------------------------------------------------------------

def save_sdxl_single_file(unet, vae, text_encoder_1, text_encoder_2, path: str, dtype=None,
                          metadata: Optional[dict] = None, logit_scale=None) -> None:
    """One SGM-layout .safetensors that ComfyUI, A1111/Forge and diffusers' from_single_file load."""
    state = sgm.diffusers_to_sgm(unet, vae, text_encoder_1, text_encoder_2, logit_scale)
    tensors = {k: cast_tensor(v, dtype) for k, v in state.items()}
    save_safetensors_atomic(tensors, path, {k: str(v) for k, v in (metadata or {}).items()})


def _write_sdxl_diffusers_parts(folder: str, pipeline, dtype) -> None:
    sd.write_diffusers_parts(folder, pipeline, dtype)  # model_index, unet, vae, text_encoder, tokenizer, scheduler
    text_encoder_2 = pipeline.text_encoder_2
    weights = {k: cast_tensor(v, dtype) for k, v in text_encoder_2.state_dict().items()}
    text_encoder_2.save_pretrained(os.path.join(folder, "text_encoder_2"), state_dict=weights)
    pipeline.tokenizer_2.save_pretrained(os.path.join(folder, "tokenizer_2"))


def save_sdxl_diffusers_folder(pipeline, path: str, dtype=None) -> None:
    replace_folder_atomically(path, lambda folder: _write_sdxl_diffusers_parts(folder, pipeline, dtype))


def sdxl_sampling_scheduler(noise_scheduler):
    """Euler with the training betas and SDXL base's "leading" spacing (what its folder ships)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(noise_scheduler.config, timestep_spacing="leading", steps_offset=1)


def build_sdxl_pipeline(unet, vae, text_encoder_1, text_encoder_2, tokenizer_1, tokenizer_2, scheduler):
    """A StableDiffusionXLPipeline around in-memory (possibly training) models; no watermarker."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder_1, text_encoder_2=text_encoder_2, tokenizer=tokenizer_1,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
