"""The Stable Diffusion 1.x/2.x family: its flags, loading/saving, strategies, denoiser call and LoRA targets.

Flags keep sd-scripts' names and meanings (--v2, --v_parameterization, --clip_skip, --max_token_length,
--weighted_captions, --vae, --no_half_vae). Weights come from library/models/sd_checkpoint.py; text
and latent strategies live in library/families/sd_text.py. LoRA targets follow sd-scripts: attention
and feed-forward linears inside the UNet's Transformer2DModel blocks (plus 3x3 convs of resnets and
resamplers with conv_dim), and CLIP's attention and MLP linears, named `lora_unet_*` / `lora_te_*`.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Optional

from library.errors import UserError
from library.families.base import FamilySettings, LoraTarget, ModelComponents, ModelFamily
from library.families.sd_text import (
    ALLOWED_MAX_TOKEN_LENGTHS,
    SDLatentsCachingStrategy,
    SDTextEncoderOutputsCachingStrategy,
    SDTextEncodingStrategy,
    SDTokenizeStrategy,
    add_caption_arguments,
)

logger = logging.getLogger(__name__)

UNET_CONTAINERS = ("Transformer2DModel",)
UNET_CONV3X3_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_CONTAINERS = ("CLIPAttention", "CLIPMLP")


def _max_token_length(args) -> int:
    return args.max_token_length or 75


@dataclass(frozen=True)
class SDSettings(FamilySettings):
    """Which SD variant the run trains (--v2, --v_parameterization)."""

    v2: bool = False
    v_parameterization: bool = False


@dataclass
class SDComponents(ModelComponents):
    v2: bool = False  # the checkpoint's text encoder is OpenCLIP-H (SD 2.x)


class SDFamily(ModelFamily):
    """SD 1.x (CLIP-L) and 2.x (OpenCLIP-H, --v2) UNet models."""

    name = "sd"
    display_name = "Stable Diffusion 1.x/2.x"
    metadata_flags = ("clip_skip", "max_token_length", "v2", "v_parameterization")  # as sd-scripts writes them
    settings_class = SDSettings
    full_precision_modules = (r"^(time_embedding|add_embedding)\b",)  # --fp8_base: the UNet's attention/FF Linears

    @property
    def base_model_version(self) -> str:  # sd-scripts' ss_base_model_version
        return ("sd_v2" if self.settings.v2 else "sd_v1") + ("_v" if self.settings.v_parameterization else "")

    @property
    def modelspec_name(self) -> str:  # SAI model spec names
        if not self.settings.v2:
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if self.settings.v_parameterization else "stable-diffusion-v2-512"

    # ---- arguments ----------------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("Stable Diffusion model")
        group.add_argument("--pretrained_model_name_or_path", required=True,
                           help="single-file checkpoint (.safetensors; .ckpt/.pt with plain tensors only), "
                                "diffusers model folder, or hub id (needs network)")
        group.add_argument("--v2", action="store_true", help="the model is Stable Diffusion 2.x (OpenCLIP-H)")
        group.add_argument("--v_parameterization", action="store_true",
                           help="train with v-prediction (SD 2.x 768-v models and v-prediction fine-tunes)")
        group.add_argument("--clip_skip", type=int, default=None,
                           help="use the output of the N-th last text-encoder layer (2 = penultimate)")
        add_caption_arguments(group)
        group.add_argument("--vae", default=None, help="use this VAE (file, diffusers folder or hub id) instead")
        group.add_argument("--no_half_vae", action="store_true",
                           help="keep the VAE in float32 under fp16/bf16 mixed precision")

    def settings_from_args(self, args: argparse.Namespace, kind) -> SDSettings:
        if args.max_token_length is not None and args.max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
            raise UserError(f"--max_token_length {args.max_token_length}: use 75, 150 or 225")
        if args.clip_skip is not None and args.clip_skip < 1:
            raise UserError(f"--clip_skip {args.clip_skip}: use 1 (last layer) or more")
        if args.v_parameterization and not args.v2:
            logger.warning("--v_parameterization without --v2: only right for v-prediction SD 1.x fine-tunes")
        return SDSettings(kind=kind, v2=bool(args.v2), v_parameterization=bool(args.v_parameterization))

    # ---- loading ------------------------------------------------------------------------------------

    def load(self, args: argparse.Namespace, with_vae: bool = True) -> ModelComponents:
        from library.models.sd_checkpoint import load_sd_models, sd_noise_scheduler

        full_finetune = self.settings.kind.is_full_fine_tune
        models = load_sd_models(args.pretrained_model_name_or_path, args.vae, full_finetune, with_vae)
        source = args.pretrained_model_name_or_path
        if models.v2 != bool(args.v2):
            layout = "an SD 2.x model (OpenCLIP text encoder)" if models.v2 else "an SD 1.x model (CLIP-L text encoder)"
            fix = "add --v2" if models.v2 else "remove --v2"
            raise UserError(f"{source} is {layout}; {fix}")
        layers = models.text_encoder.config.num_hidden_layers
        if args.clip_skip is not None and args.clip_skip > layers:
            raise UserError(f"--clip_skip {args.clip_skip}: the text encoder has only {layers} layers")
        return SDComponents(
            denoiser=models.unet, vae=models.vae, text_encoders=[models.text_encoder],
            tokenizers=[models.tokenizer], noise_scheduler=sd_noise_scheduler(args.v_parameterization),
            source=source, v2=models.v2,
        )

    # ---- strategies ---------------------------------------------------------------------------------

    def tokenize_strategy(self, args, components: ModelComponents) -> SDTokenizeStrategy:
        return SDTokenizeStrategy(components.tokenizers[0], _max_token_length(args), args.weighted_captions)

    def text_encoding_strategy(self, args) -> SDTextEncodingStrategy:
        return SDTextEncodingStrategy(clip_skip=args.clip_skip)

    def latents_caching_strategy(self, args) -> SDLatentsCachingStrategy:
        from library.strategies import weights_identity

        strategy = SDLatentsCachingStrategy()
        strategy.vae_identity = weights_identity(args.vae or args.pretrained_model_name_or_path)
        return strategy

    def text_encoder_outputs_caching_strategy(self, args, components) -> Optional[SDTextEncoderOutputsCachingStrategy]:
        return SDTextEncoderOutputsCachingStrategy(
            v2=args.v2, max_token_length=_max_token_length(args), clip_skip=args.clip_skip,
            weighted=args.weighted_captions, source=str(args.pretrained_model_name_or_path),
        )

    # ---- training -----------------------------------------------------------------------------------

    def noise_scheme(self, args, components: ModelComponents):
        from library.training.noise import DDPMNoiseScheme

        return DDPMNoiseScheme.from_args(components.noise_scheduler, args)

    def predict(self, components: ModelComponents, noisy_latents, timesteps, conditioning, batch: dict):
        return components.denoiser(
            noisy_latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"]
        ).sample

    def lora_targets(self, components: ModelComponents) -> list[LoraTarget]:
        from library.families.sd_lora_names import SD_UNET_BLOCKS

        unet = LoraTarget(
            prefix="lora_unet", root=components.denoiser, container_classes=UNET_CONTAINERS,
            conv3x3_container_classes=UNET_CONV3X3_CONTAINERS, block_layout=SD_UNET_BLOCKS,
        )
        text_encoder = components.text_encoders[0]
        # transformers 5 dropped CLIPTextModel's `text_model.` level; kohya names keep it
        file_path_prefix = "" if hasattr(text_encoder, "text_model") else "text_model."
        te = LoraTarget(
            prefix="lora_te", root=text_encoder, container_classes=TEXT_ENCODER_CONTAINERS,
            file_path_prefix=file_path_prefix, is_text_encoder=True,
        )
        return [unet, te]

    # ---- saving and sampling ------------------------------------------------------------------------

    def build_pipeline(self, components: ModelComponents, scheduler=None):
        """A diffusers StableDiffusionPipeline around the in-memory components (DDIM unless given)."""
        from library.models.sd_checkpoint import build_sd_pipeline, sampling_scheduler

        scheduler = scheduler or sampling_scheduler(components.noise_scheduler)
        return build_sd_pipeline(
            components.denoiser, components.vae, components.text_encoders[0], components.tokenizers[0], scheduler
        )

    def sample_pipeline_kwargs(self, prompt, args, components: ModelComponents) -> dict:
        """CFG and negative prompt as every family, plus --clip_skip (diffusers counts skipped layers from 0)."""
        kwargs = super().sample_pipeline_kwargs(prompt, args, components)
        if args.clip_skip and args.clip_skip > 1:
            kwargs["clip_skip"] = args.clip_skip - 1
        return kwargs

    def save_full_model(self, components: ModelComponents, path: str, save_as: str, dtype, metadata: dict) -> None:
        from library.models.sd_checkpoint import save_sd_diffusers_folder, save_sd_single_file

        if save_as == "safetensors":
            save_sd_single_file(
                components.denoiser, components.vae, components.text_encoders[0], path,
                v2=components.v2, dtype=dtype, metadata=metadata,
            )
        elif save_as == "diffusers":
            save_sd_diffusers_folder(self.build_pipeline(components), path, dtype)
        else:
            raise UserError(f"--save_model_as {save_as}: use safetensors or diffusers")

    # ---- the stand-alone tools ----------------------------------------------------------------------

    def load_vae(self, args: argparse.Namespace):
        """--vae, or the VAE of --pretrained_model_name_or_path; a single file is read for its VAE tensors only."""
        from library.models import sd_checkpoint

        source = args.vae or getattr(args, "pretrained_model_name_or_path", None)
        if source is None:
            raise UserError("give the model with --pretrained_model_name_or_path (or a VAE with --vae)")
        if args.vae is None and os.path.isfile(source) and source.endswith(".safetensors"):
            return _vae_from_single_file(source)
        return sd_checkpoint.load_vae(source)

    def lora_file_layout(self):
        from library.families.sd_lora_names import SDLoraFileLayout

        return SDLoraFileLayout(self.display_name)


def _vae_from_single_file(path: str):
    """The VAE of an SD single-file checkpoint, reading only its `first_stage_model.*` tensors."""
    from safetensors import safe_open

    from library.models import checkpoint_detect, sd_checkpoint
    from library.models.sd_ldm_layout import VAE_PREFIX

    keys = checkpoint_detect.read_checkpoint_keys(path)
    checkpoint_detect.check_checkpoint_family(path, keys, {"sd", "sd2"})
    vae_keys = [key for key in keys if key.startswith(VAE_PREFIX)]
    if not vae_keys:
        raise UserError(f"{path} has no VAE weights (first_stage_model.*); add --vae with a VAE file or folder")
    with safe_open(path, framework="pt") as f:
        state = {key: f.get_tensor(key) for key in vae_keys}
    return sd_checkpoint._load_vae_from_ldm(state, path)
