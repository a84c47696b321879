"""The FLUX.1 family (dev and schnell): flags, loading, strategies, flow matching, the transformer call,
LoRA targets in BFL names and block swapping.

Flags keep sd-scripts' flux_train_network.py names: --clip_l/--t5xxl/--ae (single files), --t5xxl_max_token_length
(default 512 for dev, 256 for schnell, detected from the transformer: schnell has no guidance weights),
--apply_t5_attn_mask, --guidance_scale, --fp8_base/--fp8_base_unet/--base_weights_dtype (the generic
frozen-weight storage of library/quantized_base.py: the transformer's Linears but its input/output and
embedding layers, and T5-XXL, the family's large text encoder), --blocks_to_swap (library/offload.py, sd-scripts' split: N/2 double blocks and
2 x the rest single blocks), and the flow-matching flags (library/training/flow_matching.py) instead
of DDPM's. --t5_tokenizer is ours: where the T5 vocabulary comes from offline.
`predict` packs latents 2x2 into tokens, builds image/text position ids and the guidance input (dev),
and unpacks the output (the velocity noise - latents; the noise scheme applies --model_prediction_type). LoRA modules are named as in BFL files
(`lora_unet_double_blocks_0_img_attn_qkv`, ...): BFL's fused linears are one LoRA module over
diffusers' separate q/k/v (networks/lora_fused.py). Family --network_args: train_blocks, train_t5xxl,
img_attn_dim ... single_mod_dim, train_double_block_indices, train_single_block_indices (sd-scripts).
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from library.errors import UserError
from library.families.base import FamilySettings, LoraTarget, ModelComponents, ModelFamily
from library.families.flux_text import (
    FluxLatentsCachingStrategy,
    FluxTextEncoderOutputsCachingStrategy,
    FluxTextEncodingStrategy,
    FluxTokenizeStrategy,
    text_encoders_fingerprint,
)
from networks.network_arguments import parse_block_selection

logger = logging.getLogger(__name__)

DOUBLE_BLOCK, SINGLE_BLOCK = "FluxTransformerBlock", "FluxSingleTransformerBlock"
TRAIN_BLOCKS = {"all": (DOUBLE_BLOCK, SINGLE_BLOCK), "double": (DOUBLE_BLOCK,), "single": (SINGLE_BLOCK,)}
CLIP_CONTAINERS = ("CLIPAttention", "CLIPMLP")
T5_CONTAINERS = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")
# sd-scripts' per-type ranks: key -> substrings of the LoRA name that select the modules it sizes
TYPE_DIMS = {
    "img_attn_dim": ("img_attn",), "txt_attn_dim": ("txt_attn",), "img_mlp_dim": ("img_mlp",),
    "txt_mlp_dim": ("txt_mlp",), "img_mod_dim": ("img_mod",), "txt_mod_dim": ("txt_mod",),
    "single_dim": ("single_blocks", "linear"), "single_mod_dim": ("modulation",),
}
BLOCK_SELECTIONS = {"train_double_block_indices": "double_blocks", "train_single_block_indices": "single_blocks"}
FAMILY_NETWORK_ARGS = ("train_blocks", "train_t5xxl", *TYPE_DIMS, *BLOCK_SELECTIONS)
DEFAULT_GUIDANCE_SCALE = 3.5


# ---- latents as tokens ------------------------------------------------------------------------------

def pack_latents(latents):
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch becomes one token (BFL / diffusers order)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, height: int, width: int):
    """Inverse of pack_latents for latents of [height, width]."""
    b, _, packed_channels = tokens.shape
    c = packed_channels // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_position_ids(height: int, width: int, device, dtype):
    """[(H/2)(W/2), 3] ids: 0, row, column of each packed token."""
    import torch

    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


# ---- family --network_args --------------------------------------------------------------------------

def family_network_args(args: argparse.Namespace) -> dict[str, str]:
    """FLUX's own --network_args keys (networks.lora is given the rest, see ModelFamily.network_arg_keys)."""
    from networks.network_arguments import family_network_args as given

    return given(args, FAMILY_NETWORK_ARGS)


class FluxLoraSettings:
    """The family --network_args, validated."""

    def __init__(self, given: dict[str, str]):
        self.given = dict(given)
        self.train_blocks = given.get("train_blocks", "all")
        if self.train_blocks not in TRAIN_BLOCKS:
            raise UserError(f"--network_args train_blocks={self.train_blocks}: use all, single or double")
        flag = given.get("train_t5xxl", "false").lower()
        if flag not in ("true", "false"):
            raise UserError(f"--network_args train_t5xxl={given['train_t5xxl']}: use True or False")
        self.train_t5xxl = flag == "true"
        self.type_dims = {}
        for key in TYPE_DIMS:
            if key in given:
                if not given[key].isdigit():
                    raise UserError(f"--network_args {key}={given[key]}: expected a rank (0 leaves those modules out)")
                self.type_dims[key] = int(given[key])
        self.selections = {key: parse_block_selection(key, given[key]) for key in BLOCK_SELECTIONS if key in given}

    def check_block_counts(self, counts: dict[str, int]) -> None:
        for key, chosen in self.selections.items():
            count = counts[BLOCK_SELECTIONS[key]]
            if chosen and max(chosen) >= count:
                raise UserError(f"--network_args {key}: block {max(chosen)} does not exist (the model has {count})")

    def module_rank(self, name: str) -> Optional[int]:
        """Rank of the transformer LoRA module `name` (lora_unet_...); None means --network_dim."""
        rank = next((self.type_dims[key] for key, marks in TYPE_DIMS.items()
                     if key in self.type_dims and all(mark in name for mark in marks)), None)
        match = re.match(r"lora_unet_(double_blocks|single_blocks)_(\d+)_", name)
        for key, blocks in BLOCK_SELECTIONS.items():
            chosen = self.selections.get(key)
            if match and match.group(1) == blocks and chosen is not None and int(match.group(2)) not in chosen:
                return 0
        return rank


def flux_swap_split(blocks_to_swap: int, num_double: int, num_single: int) -> tuple[int, int]:
    """sd-scripts' split of --blocks_to_swap: N // 2 double blocks and 2 x (N - N // 2) single blocks
    (a single block is about half a double block); at least two of each list stay on the GPU."""
    double, single = blocks_to_swap // 2, (blocks_to_swap - blocks_to_swap // 2) * 2
    if blocks_to_swap < 0 or double > num_double - 2 or single > num_single - 2:
        largest = max((n for n in range(0, 2 * (num_double + num_single))
                       if n // 2 <= num_double - 2 and (n - n // 2) * 2 <= num_single - 2), default=0)
        raise UserError(f"--blocks_to_swap {blocks_to_swap}: this FLUX model ({num_double} double and {num_single} "
                        f"single blocks) can swap at most {largest}")
    return double, single


@dataclass(frozen=True)
class FluxSettings(FamilySettings):
    """FLUX's flags for one run, validated."""

    flow_options: Any = None  # library.training.flow_matching.FlowMatchingOptions
    apply_t5_attn_mask: bool = False
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    t5xxl_max_token_length: Optional[int] = None  # None: 512 for dev, 256 for schnell
    save_lora_format: str = "kohya"
    lora: FluxLoraSettings = field(default_factory=lambda: FluxLoraSettings({}))


@dataclass
class FluxComponents(ModelComponents):
    is_schnell: bool = False  # the transformer has no guidance input (schnell, not dev)


class FluxFamily(ModelFamily):
    """FLUX.1 dev / schnell with CLIP-L, T5-XXL and the 16-channel AE."""

    name = "flux"
    display_name = "FLUX.1"
    base_model_version = "flux1"
    text_cache_trains_denoiser_only = True
    metadata_flags = ("v_parameterization",)  # sd-scripts writes it for every model (refused here: always False)
    settings_class = FluxSettings
    network_arg_keys = FAMILY_NETWORK_ARGS
    has_block_lists = True
    full_precision_modules = (r"^(x_embedder|context_embedder|time_text_embed|norm_out|proj_out)\b",)
    large_text_encoders = (1,)  # T5-XXL

    def modelspec_architecture(self, components: FluxComponents) -> str:
        return "flux-1-schnell" if components.is_schnell else "flux-1-dev"

    # ---- arguments ----------------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from library.offload import add_blocks_to_swap_argument

        group = parser.add_argument_group("FLUX.1 model")
        group.add_argument("--pretrained_model_name_or_path", required=True,
                           help="FLUX.1 transformer file (flux1-dev.safetensors, BFL layout, bf16/fp16/fp8) or a "
                                "diffusers FLUX folder (or hub id, needs network)")
        group.add_argument("--clip_l", default=None, help="clip_l.safetensors (required with a transformer file)")
        group.add_argument("--t5xxl", default=None, help="t5xxl_fp16.safetensors or fp8 (required with a transformer file)")
        group.add_argument("--ae", default=None, help="ae.safetensors (required with a transformer file)")
        group.add_argument("--t5_tokenizer", default=None,
                           help="folder with the T5 tokenizer (spiece.model or tokenizer.json) or a .model file; "
                                "default: the diffusers folder's tokenizer_2, else google/t5-v1_1-xxl from the hub")
        group.add_argument("--t5xxl_max_token_length", type=int, default=None,
                           help="T5 tokens per caption (default 512 for dev, 256 for schnell)")
        group.add_argument("--apply_t5_attn_mask", action="store_true",
                           help="mask T5 padding in T5 and in the transformer's attention")
        group.add_argument("--guidance_scale", type=float, default=None,
                           help=f"guidance input of the guidance-distilled dev model (default {DEFAULT_GUIDANCE_SCALE})")
        add_blocks_to_swap_argument(group, "transformer blocks")
        group.add_argument("--save_lora_format", choices=("kohya", "diffusers"), default="kohya",
                           help="LoRA file keys: kohya (BFL names, default; ComfyUI, sd-scripts, diffusers) or "
                                "diffusers (PEFT keys)")

    def add_noise_arguments(self, parser: argparse.ArgumentParser) -> None:
        from library.training.flow_matching import FLUX_OBJECTIVE, add_flow_matching_arguments

        add_flow_matching_arguments(parser, FLUX_OBJECTIVE)

    def settings_from_args(self, args: argparse.Namespace, kind) -> FluxSettings:
        from library.offload import validated_blocks_to_swap
        from library.training.flow_matching import FLUX_OBJECTIVE, FlowMatchingOptions, reject_ddpm_flags

        reject_ddpm_flags(args, self.display_name)
        flow_options = FlowMatchingOptions.from_args(args, FLUX_OBJECTIVE)
        if args.t5xxl_max_token_length is not None and args.t5xxl_max_token_length < 1:
            raise UserError(f"--t5xxl_max_token_length must be at least 1 (got {args.t5xxl_max_token_length})")
        blocks_to_swap = validated_blocks_to_swap(args.blocks_to_swap)
        lora = FluxLoraSettings({})
        if kind.is_full_fine_tune:
            if args.save_lora_format != "kohya":
                raise UserError("--save_lora_format applies to LoRA training only")
            if args.train_text_encoder:
                raise UserError("--train_text_encoder: FLUX.1 full fine-tuning trains the transformer only (as "
                                "sd-scripts' flux_train.py; only the transformer is saved); drop the flag")
        else:
            lora = self._validate_lora_flags(args)
        return FluxSettings(
            kind=kind, blocks_to_swap=blocks_to_swap, flow_options=flow_options,
            apply_t5_attn_mask=bool(args.apply_t5_attn_mask),
            guidance_scale=DEFAULT_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale,
            t5xxl_max_token_length=args.t5xxl_max_token_length,
            save_lora_format=args.save_lora_format, lora=lora,
        )

    @staticmethod
    def _validate_lora_flags(args) -> FluxLoraSettings:
        lora = FluxLoraSettings(family_network_args(args))
        if lora.train_t5xxl and args.network_train_unet_only:
            raise UserError("--network_args train_t5xxl=True trains a text encoder; drop --network_train_unet_only")
        if lora.train_t5xxl and args.save_lora_format == "diffusers":
            raise UserError("--save_lora_format diffusers cannot hold T5 LoRA modules (diffusers' FluxPipeline "
                            "loads LoRA into the transformer and CLIP only); drop train_t5xxl or save kohya files")
        return lora

    def t5_max_length(self, components: FluxComponents) -> int:
        return self.settings.t5xxl_max_token_length or (256 if components.is_schnell else 512)

    # ---- loading ------------------------------------------------------------------------------------

    def load(self, args: argparse.Namespace, with_vae: bool = True) -> ModelComponents:
        from library.models.flux_checkpoint import load_flux_models
        from library.models.flux_checkpoint import flux_sampling_scheduler
        from library.devices import torch_dtype

        models = load_flux_models(args.pretrained_model_name_or_path, args.clip_l, args.t5xxl, args.ae,
                                  args.t5_tokenizer, dtype=torch_dtype(args.mixed_precision),
                                  keep_fp8=self.denoiser_storage is not None, with_vae=with_vae)
        if models.is_schnell and args.guidance_scale is not None:
            raise UserError("--guidance_scale has no effect: this is a FLUX.1 schnell model (no guidance input)")
        components = FluxComponents(
            denoiser=models.transformer, vae=models.vae, text_encoders=[models.clip_l, models.t5xxl],
            tokenizers=[models.clip_tokenizer, models.t5_tokenizer], noise_scheduler=flux_sampling_scheduler(),
            source=args.pretrained_model_name_or_path, is_schnell=models.is_schnell,
            text_encoders_fingerprint=text_encoders_fingerprint(models.clip_l, models.t5xxl),
        )
        logger.info("FLUX.1 %s, T5 length %d", "schnell" if models.is_schnell else "dev", self.t5_max_length(components))
        return components

    def block_swap_groups(self, transformer, blocks_to_swap: int):
        """sd-scripts' split of --blocks_to_swap over the double and single blocks (flux_swap_split)."""
        double, single = flux_swap_split(blocks_to_swap, len(transformer.transformer_blocks),
                                         len(transformer.single_transformer_blocks))
        return [("double", transformer.transformer_blocks, double),
                ("single", transformer.single_transformer_blocks, single)]

    # ---- strategies ---------------------------------------------------------------------------------

    def tokenize_strategy(self, args, components: ModelComponents) -> FluxTokenizeStrategy:
        return FluxTokenizeStrategy(components.tokenizers[0], components.tokenizers[1], self.t5_max_length(components))

    def text_encoding_strategy(self, args) -> FluxTextEncodingStrategy:
        return FluxTextEncodingStrategy(args.apply_t5_attn_mask)

    def latents_caching_strategy(self, args) -> FluxLatentsCachingStrategy:
        return FluxLatentsCachingStrategy()

    def text_encoder_outputs_caching_strategy(self, args, components: FluxComponents):
        return FluxTextEncoderOutputsCachingStrategy(components.text_encoders_fingerprint,
                                                     self.t5_max_length(components), args.apply_t5_attn_mask)

    # ---- training -----------------------------------------------------------------------------------

    def noise_scheme(self, args, components: ModelComponents):
        from library.training.flow_matching import FLUX_OBJECTIVE, FlowMatchingNoiseScheme, FlowMatchingOptions

        # FLUX takes sigma (diffusers scales it by 1000 inside) and predicts the velocity noise - latents
        return FlowMatchingNoiseScheme(self.settings.flow_options or FlowMatchingOptions.from_args(args, FLUX_OBJECTIVE))

    def objective_metadata(self, components: FluxComponents) -> dict[str, str]:
        settings = self.settings
        metadata = {**settings.flow_options.metadata(), "ss_apply_t5_attn_mask": str(settings.apply_t5_attn_mask)}
        if not components.is_schnell:
            metadata["ss_guidance_scale"] = str(settings.guidance_scale)
        return metadata

    def predict(self, components: ModelComponents, noisy_latents, timesteps, conditioning, batch: dict):
        import torch

        transformer = components.denoiser
        batch_size, _, height, width = noisy_latents.shape
        dtype, device = noisy_latents.dtype, noisy_latents.device
        t5_states = conditioning["t5_hidden_states"].to(device, dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch_size,), float(self.settings.guidance_scale), device=device, dtype=torch.float32)
        attention = None
        if self.settings.apply_t5_attn_mask:
            attention = {"attention_mask": joint_attention_mask(conditioning["t5_attention_mask"], height, width, device)}
        output = transformer(
            hidden_states=pack_latents(noisy_latents), encoder_hidden_states=t5_states,
            pooled_projections=conditioning["pooled"].to(device, dtype), timestep=timesteps.to(dtype),
            img_ids=image_position_ids(height, width, device, dtype),
            txt_ids=torch.zeros(t5_states.shape[1], 3, device=device, dtype=dtype), guidance=guidance,
            joint_attention_kwargs=attention, return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    # ---- LoRA ---------------------------------------------------------------------------------------

    def lora_targets(self, components: ModelComponents) -> list[LoraTarget]:
        from library.models.flux_checkpoint import diffusers_to_bfl_module

        transformer, settings = components.denoiser, self.settings.lora
        settings.check_block_counts({"double_blocks": len(transformer.transformer_blocks),
                                     "single_blocks": len(transformer.single_transformer_blocks)})
        save_format = self.settings.save_lora_format
        fused = {DOUBLE_BLOCK: (("attn.to_q", "attn.to_k", "attn.to_v"),
                                ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
                 SINGLE_BLOCK: (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),)}
        targets = [LoraTarget(
            prefix="lora_unet", root=transformer, container_classes=TRAIN_BLOCKS[settings.train_blocks],
            rename=diffusers_to_bfl_module, fused_groups=fused, module_rank=settings.module_rank,
            network_args=settings.given, diffusers_prefix="transformer", save_format=save_format,
        )]
        clip, t5 = components.text_encoders
        targets.append(LoraTarget(
            prefix="lora_te1", root=clip, container_classes=CLIP_CONTAINERS, is_text_encoder=True,
            file_path_prefix="" if hasattr(clip, "text_model") else "text_model.",
            diffusers_prefix="text_encoder", save_format=save_format,
        ))
        if settings.train_t5xxl:
            targets.append(LoraTarget(prefix="lora_te3", root=t5, container_classes=T5_CONTAINERS,
                                      is_text_encoder=True, save_format=save_format))
        return targets

    # ---- saving and sampling ------------------------------------------------------------------------

    def build_pipeline(self, components: ModelComponents, scheduler=None):
        """A diffusers FluxPipeline over the in-memory components (flow-matching Euler unless given)."""
        from diffusers import FluxPipeline

        from library.models.flux_checkpoint import flux_sampling_scheduler

        clip, t5 = components.text_encoders
        return FluxPipeline(
            scheduler=scheduler or flux_sampling_scheduler(), vae=components.vae, text_encoder=clip,
            tokenizer=components.tokenizers[0], text_encoder_2=t5, tokenizer_2=components.tokenizers[1],
            transformer=components.denoiser,
        )

    sample_size_multiple = 16  # 8 pixels per latent cell, 2x2 cells per token
    sample_default_steps = 20  # sd-scripts' FLUX default

    def sampling_scheduler(self, components: ModelComponents, sampler: str):
        """FLUX samples with flow-matching Euler and its resolution-dependent shift, whatever --ss says."""
        from library.models.flux_checkpoint import flux_sampling_scheduler

        return flux_sampling_scheduler()

    def sample_pipeline_kwargs(self, prompt, args, components: FluxComponents) -> dict:
        """--g embedded guidance (dev, default --guidance_scale); --l true CFG with a --n negative prompt."""
        guidance = self.settings.guidance_scale if prompt.guidance_scale is None else prompt.guidance_scale
        kwargs = {"max_sequence_length": self.t5_max_length(components), "guidance_scale": guidance}
        if prompt.negative_prompt:
            kwargs.update(negative_prompt=prompt.negative_prompt, true_cfg_scale=prompt.scale or 1.0)
        return kwargs

    def unused_sample_options(self, prompt, components: FluxComponents) -> list[str]:
        unused = ["--ss"] if prompt.sample_sampler else []
        if prompt.scale is not None and not prompt.negative_prompt:
            unused.append("--l")  # true CFG needs a negative prompt
        if prompt.guidance_scale is not None and components.is_schnell:
            unused.append("--g")
        return unused

    def load_vae(self, args: argparse.Namespace):
        """Only the AE (tools/cache_latents.py): --ae, else the diffusers folder's vae."""
        from library.models.flux_checkpoint import load_flux_ae

        return load_flux_ae(args.ae) if args.ae else self.load(args).vae

    def save_full_model(self, components: ModelComponents, path: str, save_as: str, dtype, metadata: dict) -> None:
        """The transformer only, as sd-scripts' flux_train.py saves it: a BFL-layout single file (ComfyUI,
        Forge, sd-scripts), or with --save_model_as diffusers a transformer folder (from_pretrained)."""
        from library.models.flux_checkpoint import save_flux_transformer_bfl, save_flux_transformer_folder

        if save_as == "diffusers":
            save_flux_transformer_folder(components.denoiser, path, dtype)
        else:
            save_flux_transformer_bfl(components.denoiser, path, dtype, {k: str(v) for k, v in metadata.items()})

    def lora_file_layout(self):
        from library.families.flux_lora_names import FluxLoraFileLayout

        return FluxLoraFileLayout(self.display_name)


def joint_attention_mask(t5_mask, height: int, width: int, device):
    """[B, 1, 1, text + image tokens] boolean key mask: T5 padding masked, every image token kept."""
    import torch

    t5_mask = t5_mask.to(device=device, dtype=torch.bool)
    image = torch.ones(t5_mask.shape[0], (height // 2) * (width // 2), device=device, dtype=torch.bool)
    return torch.cat([t5_mask, image], dim=1)[:, None, None, :]
