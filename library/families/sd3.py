"""The SD3 / SD3.5 family (SD3 medium, SD3.5 medium and large): flags, loading, strategies, sd-scripts'
SD3 flow-matching objective, the MMDiT call, LoRA targets in SAI names and block swapping.

Flags keep sd-scripts' sd3_train_network.py names: --clip_l/--clip_g/--t5xxl (files that replace the
encoders of the checkpoint), --t5xxl_max_token_length (default 256), --apply_lg_attn_mask,
--apply_t5_attn_mask, --clip_l_dropout_rate/--clip_g_dropout_rate/--t5_dropout_rate (also on cached
outputs, library/families/sd3_text.py), --blocks_to_swap (library/offload.py, one list of joint blocks,
at least two stay on the GPU), --weighting_scheme/--logit_mean/--logit_std/--mode_scale and
--training_shift, --min_timestep/--max_timestep. The objective (sd-scripts' sd3_train_utils): u from
diffusers' `compute_density_for_timestep_sampling`, shifted u' = s*u / (1 + (s-1)*u), timestep =
floor(u' * (max - min) + min) (0 and 1000 by default), sigma = timestep / 1000; the MMDiT gets the timestep, its output is preconditioned as
noisy - sigma * output and compared with the clean latents, loss weighted by
`compute_loss_weighting_for_sd3`. --t5_tokenizer is ours: where the T5 vocabulary comes from offline.
LoRA modules are named as sd-scripts' networks/lora_sd3.py names them (library/families/sd3_lora_names.py);
SAI's fused qkv is one LoRA module over diffusers' separate q/k/v (networks/lora_fused.py). The family's
own --network_args (per-part ranks, train_block_indices) are in library/families/sd3_lora_settings.py.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

from library.errors import UserError
from library.families.base import FamilySettings, LoraTarget, ModelComponents, ModelFamily
from library.families.sd3_lora_settings import SD3_NETWORK_ARGS, SD3LoraSettings
from library.training.flow_matching import FlowMatchingNoiseScheme
from networks.network_arguments import family_network_args

logger = logging.getLogger(__name__)

JOINT_BLOCK = "JointTransformerBlock"
CLIP_CONTAINERS = ("CLIPAttention", "CLIPMLP")
FUSED_GROUPS = {JOINT_BLOCK: (("attn.to_q", "attn.to_k", "attn.to_v"),
                              ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                              ("attn2.to_q", "attn2.to_k", "attn2.to_v"))}
ENCODER_DROPOUT_FLAGS = ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate")
TIMESTEPS = 1000


def add_sd3_noise_arguments(parser: argparse.ArgumentParser) -> None:
    from library.training.flow_matching import WEIGHTING_SCHEMES, add_flow_loss_arguments

    group = parser.add_argument_group("SD3 flow matching: timesteps and loss")
    group.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default=None,
                       help="logit_normal/mode: density of the timesteps; sigma_sqrt/cosmap: loss weights; "
                            "default uniform")
    group.add_argument("--logit_mean", type=float, default=None, help="mean for logit_normal (default 0.0)")
    group.add_argument("--logit_std", type=float, default=None, help="std for logit_normal (default 1.0)")
    group.add_argument("--mode_scale", type=float, default=None, help="scale for the mode scheme (default 1.29)")
    group.add_argument("--training_shift", type=float, default=1.0,
                       help="shift of the timestep distribution, s*u/(1+(s-1)*u): >1 noisier (composition), "
                            "<1 cleaner (details); default 1.0")
    add_flow_loss_arguments(parser, group)


class SD3NoiseScheme(FlowMatchingNoiseScheme):
    """sd-scripts' SD3 objective: shifted sigmas squeezed into --min/--max_timestep and quantized to
    thousandths; the output preconditioned as noisy - sigma * output is compared with the clean latents
    (SD3_OBJECTIVE's sigma_scaled); model timesteps = 1000 * sigma."""

    def __init__(self, options, training_shift: float):
        super().__init__(options, model_timestep_scale=float(TIMESTEPS))
        self.training_shift = training_shift

    def sample_timesteps(self, batch_size, device, generator, latent_shape=None):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        from library.training.flow_matching import shift_sigmas

        o = self.options
        u = compute_density_for_timestep_sampling(
            weighting_scheme=o.weighting_scheme, batch_size=batch_size, logit_mean=o.logit_mean,
            logit_std=o.logit_std, mode_scale=o.mode_scale, device=generator.device, generator=generator)
        low, high = (round(bound * TIMESTEPS) for bound in o.sigma_range)
        shifted = shift_sigmas(u.cpu(), self.training_shift)
        indices = (shifted * (high - low) + low).long().clamp(low, max(high - 1, low))
        return (indices.float() / TIMESTEPS).to(device)


def sd3_swap_limit(num_blocks: int) -> int:
    return max(num_blocks - 2, 0)


@dataclass(frozen=True)
class SD3Settings(FamilySettings):
    """SD3's flags for one run, validated."""

    flow_options: Any = None  # library.training.flow_matching.FlowMatchingOptions
    dropout_rates: tuple = (0.0, 0.0, 0.0)  # --clip_l/--clip_g/--t5 _dropout_rate
    training_shift: float = 1.0
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False
    save_lora_format: str = "kohya"
    lora: Any = None  # library.families.sd3_lora_settings.SD3LoraSettings (LoRA runs)


class SD3Family(ModelFamily):
    """SD3 medium / SD3.5 medium / SD3.5 large with CLIP-L, CLIP-G, T5-XXL and the 16-channel VAE."""

    name = "sd3"
    display_name = "SD3/SD3.5"
    base_model_version = "sd3"
    text_cache_trains_denoiser_only = True
    metadata_flags = ("v_parameterization",)  # sd-scripts writes it for every model (refused here: always False)
    modelspec_name = "stable-diffusion-v3"
    has_block_lists = True
    settings_class = SD3Settings
    network_arg_keys = SD3_NETWORK_ARGS
    full_precision_modules = (r"^(pos_embed|context_embedder|time_text_embed|norm_out|proj_out)\b",)
    large_text_encoders = (2,)  # T5-XXL

    # ---- arguments ----------------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from library.offload import add_blocks_to_swap_argument

        group = parser.add_argument_group("SD3 / SD3.5 model")
        group.add_argument("--pretrained_model_name_or_path", required=True,
                           help="SAI single file (sd3.5_large.safetensors; MMDiT + VAE, text encoders optional) or "
                                "a local diffusers SD3 folder")
        for key, what in (("clip_l", "clip_l.safetensors"), ("clip_g", "clip_g.safetensors"),
                          ("t5xxl", "t5xxl_fp16.safetensors")):
            group.add_argument(f"--{key}", default=None,
                               help=f"{what}: replaces (or supplies) that text encoder of the checkpoint")
        group.add_argument("--t5_tokenizer", default=None,
                           help="folder with the T5 tokenizer (spiece.model or tokenizer.json) or a .model file; "
                                "default: the diffusers folder's tokenizer_3, else google/t5-v1_1-xxl from the hub")
        group.add_argument("--t5xxl_max_token_length", type=int, default=256, help="T5 tokens per caption (default 256)")
        group.add_argument("--apply_lg_attn_mask", action="store_true", help="mask CLIP-L/G padding inside the encoders")
        group.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding inside T5")
        for flag in ENCODER_DROPOUT_FLAGS:
            group.add_argument(f"--{flag}", type=float, default=0.0,
                               help=f"probability of zeroing this encoder's outputs per sample (default 0)")
        add_blocks_to_swap_argument(group, "joint blocks")
        group.add_argument("--save_lora_format", choices=("kohya", "diffusers"), default="kohya",
                           help="LoRA file keys: kohya (SAI names, default; ComfyUI, sd-scripts) or diffusers "
                                "(PEFT keys; what diffusers' StableDiffusion3Pipeline loads)")

    def add_noise_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_sd3_noise_arguments(parser)

    def settings_from_args(self, args: argparse.Namespace, kind) -> SD3Settings:
        from library.offload import validated_blocks_to_swap
        from library.training.flow_matching import SD3_OBJECTIVE, FlowMatchingOptions, reject_ddpm_flags

        reject_ddpm_flags(args, self.display_name)
        flow_options = FlowMatchingOptions.from_args(args, SD3_OBJECTIVE)
        if args.training_shift <= 0:
            raise UserError(f"--training_shift must be positive (got {args.training_shift})")
        if args.t5xxl_max_token_length < 1:
            raise UserError(f"--t5xxl_max_token_length must be at least 1 (got {args.t5xxl_max_token_length})")
        for flag in ENCODER_DROPOUT_FLAGS:
            if not 0 <= getattr(args, flag) <= 1:
                raise UserError(f"--{flag} must be in [0, 1] (got {getattr(args, flag)})")
        dropout_rates = tuple(float(getattr(args, flag)) for flag in ENCODER_DROPOUT_FLAGS)
        blocks_to_swap = validated_blocks_to_swap(args.blocks_to_swap)
        if kind.is_full_fine_tune:
            if args.save_lora_format != "kohya":
                raise UserError("--save_lora_format applies to LoRA training only")
        lora = None if kind.is_full_fine_tune else SD3LoraSettings(family_network_args(args, SD3_NETWORK_ARGS))
        return SD3Settings(kind=kind, blocks_to_swap=blocks_to_swap, flow_options=flow_options, lora=lora,
                           dropout_rates=dropout_rates, training_shift=args.training_shift,
                           apply_lg_attn_mask=bool(args.apply_lg_attn_mask),
                           apply_t5_attn_mask=bool(args.apply_t5_attn_mask), save_lora_format=args.save_lora_format)

    # ---- loading ------------------------------------------------------------------------------------

    def load(self, args: argparse.Namespace, with_vae: bool = True) -> ModelComponents:
        from library.families.sd3_text import text_encoders_fingerprint
        from library.models.sd3_checkpoint import load_sd3_models, sd3_sampling_scheduler
        from library.devices import torch_dtype

        models = load_sd3_models(args.pretrained_model_name_or_path, args.clip_l, args.clip_g, args.t5xxl,
                                 args.t5_tokenizer, dtype=torch_dtype(args.mixed_precision), with_vae=with_vae)
        config = models.transformer.config
        logger.info("SD3 MMDiT: %d blocks, dual attention in %s, qk norm %s", config.num_layers,
                    list(config.dual_attention_layers) or "none", config.qk_norm or "none")
        return ModelComponents(
            denoiser=models.transformer, vae=models.vae, text_encoders=models.text_encoders,
            tokenizers=models.tokenizers, noise_scheduler=sd3_sampling_scheduler(),
            source=args.pretrained_model_name_or_path,
            text_encoders_fingerprint=text_encoders_fingerprint(models.text_encoders),
        )

    def block_swap_groups(self, transformer, blocks_to_swap: int):
        """One list of joint blocks; at least two stay on the GPU."""
        blocks = transformer.transformer_blocks
        if blocks_to_swap > sd3_swap_limit(len(blocks)):
            raise UserError(f"--blocks_to_swap {blocks_to_swap}: this SD3 model has {len(blocks)} joint blocks and "
                            f"can swap at most {sd3_swap_limit(len(blocks))}")
        return [("joint", blocks, blocks_to_swap)]

    # ---- strategies ---------------------------------------------------------------------------------

    def tokenize_strategy(self, args, components: ModelComponents):
        from library.families.sd3_text import SD3TokenizeStrategy

        return SD3TokenizeStrategy(*components.tokenizers, args.t5xxl_max_token_length)

    def text_encoding_strategy(self, args):
        from library.families.sd3_text import SD3TextEncodingStrategy

        return SD3TextEncodingStrategy(args.apply_lg_attn_mask, args.apply_t5_attn_mask)

    def latents_caching_strategy(self, args):
        from library.families.sd3_text import SD3LatentsCachingStrategy

        return SD3LatentsCachingStrategy()

    def text_encoder_outputs_caching_strategy(self, args, components: ModelComponents):
        from library.families.sd3_text import SD3TextEncoderOutputsCachingStrategy

        return SD3TextEncoderOutputsCachingStrategy(components.text_encoders_fingerprint, args.t5xxl_max_token_length,
                                                    args.apply_lg_attn_mask, args.apply_t5_attn_mask)

    # ---- training -----------------------------------------------------------------------------------

    def noise_scheme(self, args, components: ModelComponents):
        from library.training.flow_matching import SD3_OBJECTIVE, FlowMatchingOptions

        return SD3NoiseScheme(self.settings.flow_options or FlowMatchingOptions.from_args(args, SD3_OBJECTIVE),
                              args.training_shift)

    def objective_metadata(self, components: ModelComponents) -> dict[str, str]:
        s = self.settings
        metadata = {f"ss_{key}": str(getattr(s.flow_options, key)) for key in
                    ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "min_timestep", "max_timestep")}
        metadata.update(ss_training_shift=str(s.training_shift), ss_apply_lg_attn_mask=str(s.apply_lg_attn_mask),
                        ss_apply_t5_attn_mask=str(s.apply_t5_attn_mask))
        return metadata

    def predict(self, components: ModelComponents, noisy_latents, timesteps, conditioning, batch: dict):
        """The MMDiT's output (the noise scheme preconditions it into the x0 estimate noisy - sigma * output).
        Per-encoder dropout applies to training steps only (validation runs without gradients)."""
        import torch

        from library.families.sd3_text import drop_encoder_outputs, mmdit_inputs

        if torch.is_grad_enabled():
            conditioning = drop_encoder_outputs(conditioning, self.settings.dropout_rates)
        dtype, device = noisy_latents.dtype, noisy_latents.device
        context, pooled = mmdit_inputs(conditioning, device, dtype)
        return components.denoiser(hidden_states=noisy_latents, encoder_hidden_states=context,
                                   pooled_projections=pooled, timestep=timesteps.to(dtype), return_dict=False)[0]

    # ---- LoRA ---------------------------------------------------------------------------------------

    def lora_targets(self, components: ModelComponents) -> list[LoraTarget]:
        from library.models.sd3_checkpoint import diffusers_to_sai_module

        transformer, lora = components.denoiser, self.settings.lora or SD3LoraSettings({})
        last = len(transformer.transformer_blocks) - 1
        lora.check_block_count(last + 1)
        # the pre-only block's context adaLN has (scale, shift) rows in diffusers, (shift, scale) in SAI files
        skipped = f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1"
        targets = [LoraTarget(
            prefix="lora_unet", root=transformer, container_classes=(JOINT_BLOCK,), rename=diffusers_to_sai_module,
            fused_groups=FUSED_GROUPS, module_rank=lambda name: 0 if name == skipped else lora.module_rank(name),
            network_args=lora.given, diffusers_prefix="transformer", save_format=self.settings.save_lora_format,
        )]
        for prefix, encoder, component in zip(("lora_te1", "lora_te2"), components.text_encoders[:2],
                                              ("text_encoder", "text_encoder_2")):
            targets.append(LoraTarget(
                prefix=prefix, root=encoder, container_classes=CLIP_CONTAINERS, is_text_encoder=True,
                file_path_prefix="" if hasattr(encoder, "text_model") else "text_model.",
                diffusers_prefix=component, save_format=self.settings.save_lora_format,
            ))
        return targets

    def lora_file_layout(self):
        from library.families.sd3_lora_names import SD3LoraFileLayout

        return SD3LoraFileLayout(self.display_name)

    # ---- saving and sampling ------------------------------------------------------------------------

    def build_pipeline(self, components: ModelComponents, scheduler=None):
        from diffusers import StableDiffusion3Pipeline

        from library.models.sd3_checkpoint import sd3_sampling_scheduler

        clip_l, clip_g, t5 = components.text_encoders
        tokenizer_l, tokenizer_g, tokenizer_t5 = components.tokenizers
        return StableDiffusion3Pipeline(
            transformer=components.denoiser, scheduler=scheduler or sd3_sampling_scheduler(), vae=components.vae,
            text_encoder=clip_l, tokenizer=tokenizer_l, text_encoder_2=clip_g, tokenizer_2=tokenizer_g,
            text_encoder_3=t5, tokenizer_3=tokenizer_t5,
        )

    sample_size_multiple = 16  # 8 pixels per latent cell, 2x2 cells per patch

    def sampling_scheduler(self, components: ModelComponents, sampler: str):
        """SD3 samples with flow-matching Euler (shift 3.0), whatever --ss says."""
        from library.models.sd3_checkpoint import sd3_sampling_scheduler

        return sd3_sampling_scheduler()

    def sample_pipeline_kwargs(self, prompt, args, components: ModelComponents) -> dict:
        return {**super().sample_pipeline_kwargs(prompt, args, components),
                "max_sequence_length": args.t5xxl_max_token_length}

    def unused_sample_options(self, prompt, components: ModelComponents) -> list[str]:
        return [flag for flag, value in (("--ss", prompt.sample_sampler), ("--g", prompt.guidance_scale))
                if value is not None]

    def save_full_model(self, components: ModelComponents, path: str, save_as: str, dtype, metadata: dict) -> None:
        """An SAI single file: MMDiT, VAE and the three text encoders (loads back with no other file);
        or a StableDiffusion3Pipeline folder."""
        from library.models.saved_formats import save_pipeline_folder
        from library.models.sd3_checkpoint import save_sd3_single_file

        if save_as == "diffusers":
            save_pipeline_folder(self.build_pipeline(components), path, dtype)
            return
        save_sd3_single_file(components.denoiser, components.vae, components.text_encoders, path, dtype,
                             {k: str(v) for k, v in metadata.items()})
