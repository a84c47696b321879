"""The SDXL family: its flags, loading/saving, strategies, size-conditioned denoiser call and LoRA targets.

Flags keep sd-scripts' names (sdxl_train.py / sdxl_train_network.py): --v_parameterization for
v-prediction SDXL models, --max_token_length, --weighted_captions, --vae, --no_half_vae, and for full
fine-tunes --learning_rate_te1/--learning_rate_te2 (0 leaves that encoder frozen). SD-only flags that
would do nothing here (--v2, --clip_skip) are refused. Weights come from
library/models/sdxl_checkpoint.py; the text strategies from library/families/sdxl_text.py. Noise is
SD's DDPM schedule. The UNet's size conditioning (original size, crop top-left, target size per
sample, from the dataset's batch) is computed in `predict`, never cached. LoRA targets match
sd-scripts: attention/feed-forward linears of the UNet's Transformer2DModel blocks (plus resnet and
resampler convs with conv_dim) named by their LDM paths (`lora_unet_input_blocks_4_1_...`), and
CLIP's attention/MLP linears as `lora_te1_*` (CLIP-L) and `lora_te2_*` (bigG).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from library.errors import UserError
from library.families.base import LoraTarget, ModelComponents, ModelFamily
from library.families.sd_text import ALLOWED_MAX_TOKEN_LENGTHS, add_caption_arguments
from library.families.sdxl_text import (
    SDXLLatentsCachingStrategy,
    SDXLTextEncoderOutputsCachingStrategy,
    SDXLTextEncodingStrategy,
    SDXLTokenizeStrategy,
    text_encoders_fingerprint,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

UNET_CONTAINERS = ("Transformer2DModel",)
UNET_CONV3X3_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_CONTAINERS = ("CLIPAttention", "CLIPMLP")
TEXT_ENCODER_LR_FLAGS = ("learning_rate_te1", "learning_rate_te2")


def _max_token_length(args) -> int:
    return args.max_token_length or 75


def size_time_ids(batch: dict, device=None) -> "torch.Tensor":
    """SDXL's add_time_ids [B, 6]: original (h, w), crop (top, left), target (h, w), as float32."""
    import torch

    parts = [batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]]
    return torch.cat([part.to(device=device, dtype=torch.float32) for part in parts], dim=1)


def _text_encoder_lora_target(prefix: str, text_encoder, pipeline_component: str) -> LoraTarget:
    # transformers 5 dropped CLIPTextModel's `text_model.` level (not CLIPTextModelWithProjection's);
    # kohya names keep it for both
    file_path_prefix = "" if hasattr(text_encoder, "text_model") else "text_model."
    return LoraTarget(prefix=prefix, root=text_encoder, container_classes=TEXT_ENCODER_CONTAINERS,
                      file_path_prefix=file_path_prefix, is_text_encoder=True, diffusers_prefix=pipeline_component)


@dataclass
class SDXLComponents(ModelComponents):
    logit_scale: Any = None  # bigG's logit_scale from a single file, written back when saving one


class SDXLFamily(ModelFamily):
    """SDXL base 1.0 and its fine-tunes (epsilon or, with --v_parameterization, v-prediction)."""

    name = "sdxl"
    display_name = "SDXL"
    metadata_flags = ("clip_skip", "max_token_length", "v2", "v_parameterization")  # as sd-scripts writes them
    base_model_version = "sdxl_base_v1-0"  # sd-scripts' ss_base_model_version for SDXL
    modelspec_name = "stable-diffusion-xl-v1-base"
    full_precision_modules = (r"^(time_embedding|add_embedding)\b",)  # --fp8_base: the UNet's attention/FF Linears

    # ---- arguments ----------------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("SDXL model")
        group.add_argument("--pretrained_model_name_or_path", required=True,
                           help="SDXL single-file checkpoint (.safetensors; .ckpt/.pt with plain tensors only), "
                                "diffusers model folder, or hub id (needs network)")
        group.add_argument("--v_parameterization", action="store_true",
                           help="train with v-prediction (for v-prediction SDXL models)")
        add_caption_arguments(group)
        group.add_argument("--vae", default=None, help="use this VAE (file, diffusers folder or hub id) instead")
        group.add_argument("--no_half_vae", action="store_true",
                           help="keep the VAE in float32 under fp16/bf16 mixed precision (SDXL's VAE "
                                "overflows in fp16)")
        group.add_argument("--learning_rate_te1", type=float, default=None,
                           help="sdxl_train.py with --train_text_encoder: learning rate of CLIP-L "
                                "(default --learning_rate_te, then --learning_rate; 0 keeps it frozen)")
        group.add_argument("--learning_rate_te2", type=float, default=None,
                           help="sdxl_train.py with --train_text_encoder: learning rate of OpenCLIP bigG "
                                "(default --learning_rate_te, then --learning_rate; 0 keeps it frozen)")
        # SD-only flags users carry over from SD commands: accepted by the parser so they get a clear error
        group.add_argument("--v2", action="store_true", help=argparse.SUPPRESS)
        group.add_argument("--clip_skip", type=int, default=None, help=argparse.SUPPRESS)

    def settings_from_args(self, args: argparse.Namespace, kind):
        if args.v2:
            raise UserError("--v2 is for Stable Diffusion 2.x; SDXL has no such variant: remove --v2")
        if args.clip_skip is not None:
            raise UserError("--clip_skip has no effect on SDXL (it always uses CLIP-L's hidden state 11 and "
                            "bigG's penultimate layer): remove --clip_skip")
        if args.max_token_length is not None and args.max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
            raise UserError(f"--max_token_length {args.max_token_length}: use 75, 150 or 225")
        self._validate_text_encoder_rates(args, kind.is_full_fine_tune)
        return self.settings_class(kind=kind)

    @staticmethod
    def _validate_text_encoder_rates(args: argparse.Namespace, full_finetune: bool) -> None:
        for flag in TEXT_ENCODER_LR_FLAGS:
            value = getattr(args, flag)
            if value is None:
                continue
            if not full_finetune:
                raise UserError(f"--{flag} is for sdxl_train.py (full fine-tuning); for a LoRA use --text_encoder_lr")
            if not args.train_text_encoder:
                raise UserError(f"--{flag} has no effect without --train_text_encoder: add it or drop --{flag}")
            if value < 0:
                raise UserError(f"--{flag} must not be negative (got {value})")

    # ---- loading ------------------------------------------------------------------------------------

    def load(self, args: argparse.Namespace, with_vae: bool = True) -> ModelComponents:
        from library.models.sd_checkpoint import sd_noise_scheduler
        from library.models.sdxl_checkpoint import load_sdxl_models

        full_finetune = self.settings.kind.is_full_fine_tune
        source = args.pretrained_model_name_or_path
        models = load_sdxl_models(source, args.vae, full_finetune, with_vae)
        if models.marked_v_prediction and not args.v_parameterization:
            logger.warning("%s is marked as a v-prediction model (`v_pred` key): you probably want "
                           "--v_parameterization (and --zero_terminal_snr if it was trained with it)", source)
        return SDXLComponents(
            denoiser=models.unet, vae=models.vae, text_encoders=[models.text_encoder_1, models.text_encoder_2],
            tokenizers=[models.tokenizer_1, models.tokenizer_2],
            noise_scheduler=sd_noise_scheduler(args.v_parameterization), source=source,
            text_encoders_fingerprint=text_encoders_fingerprint(models.text_encoder_1, models.text_encoder_2),
            logit_scale=models.logit_scale,
        )

    # ---- strategies ---------------------------------------------------------------------------------

    def tokenize_strategy(self, args, components: ModelComponents) -> SDXLTokenizeStrategy:
        return SDXLTokenizeStrategy(*components.tokenizers, _max_token_length(args), args.weighted_captions)

    def text_encoding_strategy(self, args) -> SDXLTextEncodingStrategy:
        return SDXLTextEncodingStrategy()

    def latents_caching_strategy(self, args) -> SDXLLatentsCachingStrategy:
        return SDXLLatentsCachingStrategy()

    def text_encoder_outputs_caching_strategy(self, args, components) -> Optional[SDXLTextEncoderOutputsCachingStrategy]:
        return SDXLTextEncoderOutputsCachingStrategy(components.text_encoders_fingerprint, _max_token_length(args),
                                                     args.weighted_captions)

    # ---- training -----------------------------------------------------------------------------------

    def noise_scheme(self, args, components: ModelComponents):
        from library.training.noise import DDPMNoiseScheme

        return DDPMNoiseScheme.from_args(components.noise_scheduler, args)

    def predict(self, components: ModelComponents, noisy_latents, timesteps, conditioning, batch: dict):
        added = {"text_embeds": conditioning["text_embeds"],
                 "time_ids": size_time_ids(batch, device=noisy_latents.device)}
        return components.denoiser(
            noisy_latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
            added_cond_kwargs=added,
        ).sample

    def lora_targets(self, components: ModelComponents) -> list[LoraTarget]:
        from library.families.sdxl_lora_names import SDXL_UNET_BLOCKS
        from library.models.sgm_layout import unet_lora_renames

        renames = unet_lora_renames(components.denoiser)
        unet = LoraTarget(
            prefix="lora_unet", root=components.denoiser, container_classes=UNET_CONTAINERS,
            conv3x3_container_classes=UNET_CONV3X3_CONTAINERS, rename=renames.__getitem__, diffusers_prefix="unet",
            block_layout=SDXL_UNET_BLOCKS,
        )
        text_encoder_1, text_encoder_2 = components.text_encoders
        return [unet, _text_encoder_lora_target("lora_te1", text_encoder_1, "text_encoder"),
                _text_encoder_lora_target("lora_te2", text_encoder_2, "text_encoder_2")]

    # ---- saving and sampling ------------------------------------------------------------------------

    def build_pipeline(self, components: ModelComponents, scheduler=None):
        """A diffusers StableDiffusionXLPipeline around the in-memory components (Euler unless given)."""
        from library.models.sdxl_checkpoint import build_sdxl_pipeline, sdxl_sampling_scheduler

        scheduler = scheduler or sdxl_sampling_scheduler(components.noise_scheduler)
        return build_sdxl_pipeline(components.denoiser, components.vae, *components.text_encoders,
                                   *components.tokenizers, scheduler)

    def save_full_model(self, components: ModelComponents, path: str, save_as: str, dtype, metadata: dict) -> None:
        from library.models.sdxl_checkpoint import save_sdxl_diffusers_folder, save_sdxl_single_file

        if save_as == "safetensors":
            save_sdxl_single_file(components.denoiser, components.vae, *components.text_encoders, path,
                                  dtype=dtype, metadata=metadata, logit_scale=getattr(components, "logit_scale", None))
        elif save_as == "diffusers":
            save_sdxl_diffusers_folder(self.build_pipeline(components), path, dtype)
        else:
            raise UserError(f"--save_model_as {save_as}: use safetensors or diffusers")

    # ---- the stand-alone tools ----------------------------------------------------------------------

    def load_vae(self, args: argparse.Namespace):
        """--vae, or the VAE of --pretrained_model_name_or_path (of a single file only its VAE tensors)."""
        from library.models.sdxl_checkpoint import load_sdxl_vae, load_sdxl_vae_only

        if args.vae:
            return load_sdxl_vae(args.vae)
        source = getattr(args, "pretrained_model_name_or_path", None)
        if source is None:
            raise UserError("give the model with --pretrained_model_name_or_path (or a VAE with --vae)")
        return load_sdxl_vae_only(source)

    def lora_file_layout(self):
        from library.families.sdxl_lora_names import SDXLLoraFileLayout

        return SDXLLoraFileLayout(self.display_name)
