"""The Lumina Image 2.0 family: flags, loading, strategies, Lumina's flow-matching convention, the
transformer call, LoRA targets in the original names, and block swapping.

Flags keep sd-scripts' lumina_train_network.py names: --gemma2/--ae (single files), --gemma2_max_token_length
(default 256), --system_prompt (default: the prompt diffusers' Lumina2Pipeline uses; "" turns the
prefix off), --blocks_to_swap (library/offload.py over the
main `layers`, as sd-scripts swaps them) and the shared flow-matching flags with sd-scripts' Lumina
defaults (`LUMINA_OBJECTIVE`: --timestep_sampling shift, --discrete_flow_shift 6.0, --model_prediction_type
raw). --gemma2_tokenizer is ours:
where the Gemma vocabulary comes from offline.
Time runs the other way than FLUX: Lumina takes t = 1 - sigma (1 = clean image) and predicts
latents - noise: its noise scheme has output_sign -1, so raw and additive compare the output with
latents - noise (as sd-scripts does) and sigma_scaled takes noisy + sigma * output as the x0 estimate.
LoRA modules are named as sd-scripts' networks/lora_lumina.py writes them: `lora_unet_` + the original
module path (`layers_0_attention_qkv` fused over diffusers' to_q/to_k/to_v, `_attention_out`,
`_feed_forward_w1/w2/w3`, `_adaLN_modulation_1`, refiners alike) and `lora_te_` + Gemma-2 paths.
diffusers' Lumina 2 LoRA loader reads no kohya keys, so `--save_lora_format diffusers` writes PEFT keys.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

from library.errors import UserError
from library.families.base import FamilySettings, LoraFileLayout, LoraModuleNames, LoraTarget, ModelComponents, ModelFamily
from library.families.lumina_text import (
    DEFAULT_MAX_TOKEN_LENGTH,
    DEFAULT_SYSTEM_PROMPT,
    LuminaLatentsCachingStrategy,
    LuminaTextEncoderOutputsCachingStrategy,
    LuminaTextEncodingStrategy,
    LuminaTokenizeStrategy,
    gemma2_fingerprint,
)

logger = logging.getLogger(__name__)

BLOCK = "Lumina2TransformerBlock"
GEMMA_CONTAINERS = ("Gemma2Attention", "Gemma2MLP")
QKV_MEMBERS = ("attn.to_q", "attn.to_k", "attn.to_v")
# the released Lumina-Image-2.0 (for converting LoRA files without a model)
RELEASED_SIZES = {"layers": 26, "noise_refiner": 2, "context_refiner": 2}


@dataclass(frozen=True)
class LuminaSettings(FamilySettings):
    """Lumina 2's flags for one run, validated."""

    flow_options: Any = None  # library.training.flow_matching.FlowMatchingOptions
    save_lora_format: str = "kohya"


class LuminaFamily(ModelFamily):
    """Lumina Image 2.0 (NextDiT) with Gemma-2 2B and the 16-channel FLUX AE."""

    name = "lumina"
    display_name = "Lumina Image 2.0"
    base_model_version = "lumina2"
    text_cache_trains_denoiser_only = True
    metadata_flags = ("v_parameterization",)  # sd-scripts writes it for every model (refused here: always False)
    modelspec_name = "lumina-2"
    has_block_lists = True
    sample_size_multiple = 16  # 8 pixels per latent cell, 2x2 cells per token
    sample_default_steps = 30
    settings_class = LuminaSettings
    full_precision_modules = (r"^(x_embedder|time_caption_embed|norm_out)\b",)
    large_text_encoders = (0,)  # Gemma-2 2B

    # ---- arguments ----------------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from library.offload import add_blocks_to_swap_argument

        group = parser.add_argument_group("Lumina Image 2.0 model")
        group.add_argument("--pretrained_model_name_or_path", required=True,
                           help="Lumina 2 transformer file (original / ComfyUI layout) or a diffusers Lumina2Pipeline folder")
        group.add_argument("--gemma2", default=None, help="Gemma-2 2B file (required with a transformer file)")
        group.add_argument("--ae", default=None, help="ae.safetensors, the FLUX AE (required with a transformer file)")
        group.add_argument("--gemma2_tokenizer", default=None,
                           help="folder with the Gemma tokenizer (tokenizer.model or tokenizer.json) or a .model file; "
                                "default: the diffusers folder's tokenizer, else google/gemma-2-2b from the hub")
        group.add_argument("--gemma2_max_token_length", type=int, default=None,
                           help=f"Gemma-2 tokens per caption, system prompt included (default {DEFAULT_MAX_TOKEN_LENGTH})")
        group.add_argument("--system_prompt", default=None,
                           help="text put before every caption with ' <Prompt Start> ' (default: Lumina 2's own; "
                                "'' for none)")
        add_blocks_to_swap_argument(group, "transformer layers")
        group.add_argument("--save_lora_format", choices=("kohya", "diffusers"), default="kohya",
                           help="LoRA file keys: kohya (original names; sd-scripts, ComfyUI) or diffusers (PEFT keys, "
                                "what diffusers' Lumina2Pipeline loads)")

    def add_noise_arguments(self, parser: argparse.ArgumentParser) -> None:
        from library.training.flow_matching import LUMINA_OBJECTIVE, add_flow_matching_arguments

        add_flow_matching_arguments(parser, LUMINA_OBJECTIVE)

    def settings_from_args(self, args: argparse.Namespace, kind) -> LuminaSettings:
        from library.offload import validated_blocks_to_swap
        from library.training.flow_matching import LUMINA_OBJECTIVE, FlowMatchingOptions, reject_ddpm_flags

        reject_ddpm_flags(args, self.display_name)
        flow_options = FlowMatchingOptions.from_args(args, LUMINA_OBJECTIVE)
        if args.gemma2_max_token_length is not None and args.gemma2_max_token_length < 1:
            raise UserError(f"--gemma2_max_token_length must be at least 1 (got {args.gemma2_max_token_length})")
        blocks_to_swap = validated_blocks_to_swap(args.blocks_to_swap)
        full = kind.is_full_fine_tune
        if full and args.save_lora_format != "kohya":
            raise UserError("--save_lora_format applies to LoRA training only")
        if full and args.train_text_encoder:
            raise UserError("--train_text_encoder: Lumina 2 full fine-tuning trains the transformer only "
                            "(as sd-scripts' lumina_train.py); train a Gemma-2 LoRA with lumina_train_network.py")
        if not full and args.save_lora_format == "diffusers" and not args.network_train_unet_only:
            raise UserError("--save_lora_format diffusers cannot hold Gemma-2 LoRA modules (diffusers' Lumina2Pipeline "
                            "loads LoRA into the transformer only); add --network_train_unet_only or save kohya files")
        return LuminaSettings(kind=kind, blocks_to_swap=blocks_to_swap, flow_options=flow_options,
                              save_lora_format=args.save_lora_format)

    def max_length(self, args) -> int:
        return args.gemma2_max_token_length or DEFAULT_MAX_TOKEN_LENGTH

    @staticmethod
    def system_prompt(args) -> str:
        return DEFAULT_SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt

    # ---- loading ------------------------------------------------------------------------------------

    def load(self, args: argparse.Namespace, with_vae: bool = True) -> ModelComponents:
        from library.models.lumina_checkpoint import load_lumina_models, lumina_sampling_scheduler
        from library.devices import torch_dtype

        models = load_lumina_models(args.pretrained_model_name_or_path, args.gemma2, args.ae, args.gemma2_tokenizer,
                                    dtype=torch_dtype(args.mixed_precision), with_vae=with_vae)
        return ModelComponents(
            denoiser=models.transformer, vae=models.vae, text_encoders=[models.gemma2], tokenizers=[models.tokenizer],
            noise_scheduler=lumina_sampling_scheduler(), source=args.pretrained_model_name_or_path,
            text_encoders_fingerprint=gemma2_fingerprint(models.gemma2),
        )

    def load_vae(self, args: argparse.Namespace):
        from library.models.flux_checkpoint import load_flux_ae

        return load_flux_ae(args.ae) if args.ae else self.load(args).vae

    def block_swap_groups(self, transformer, blocks_to_swap: int):
        """The main `layers` (the refiners stay on the device)."""
        from library.offload import check_blocks_to_swap

        check_blocks_to_swap(blocks_to_swap, len(transformer.layers), "Lumina 2 layers")
        return [("layers", transformer.layers, blocks_to_swap)]

    # ---- strategies ---------------------------------------------------------------------------------

    def tokenize_strategy(self, args, components: ModelComponents) -> LuminaTokenizeStrategy:
        return LuminaTokenizeStrategy(components.tokenizers[0], self.max_length(args), self.system_prompt(args))

    def text_encoding_strategy(self, args) -> LuminaTextEncodingStrategy:
        return LuminaTextEncodingStrategy()

    def latents_caching_strategy(self, args) -> LuminaLatentsCachingStrategy:
        return LuminaLatentsCachingStrategy()

    def text_encoder_outputs_caching_strategy(self, args, components: ModelComponents):
        return LuminaTextEncoderOutputsCachingStrategy(components.text_encoders_fingerprint, self.max_length(args),
                                                       self.system_prompt(args))

    # ---- training -----------------------------------------------------------------------------------

    def noise_scheme(self, args, components: ModelComponents):
        from library.training.flow_matching import LUMINA_OBJECTIVE, FlowMatchingNoiseScheme, FlowMatchingOptions

        # Lumina 2 counts time from noise (0) to image (1) and predicts the velocity latents - noise
        options = self.settings.flow_options or FlowMatchingOptions.from_args(args, LUMINA_OBJECTIVE)
        return FlowMatchingNoiseScheme(options, reverse_model_timesteps=True, output_sign=-1.0)

    def objective_metadata(self, components: ModelComponents) -> dict[str, str]:
        return self.settings.flow_options.metadata()

    def predict(self, components: ModelComponents, noisy_latents, timesteps, conditioning, batch: dict):
        """`timesteps` are Lumina's (1 - sigma); the output is Lumina's velocity latents - noise."""
        dtype, device = noisy_latents.dtype, noisy_latents.device
        return components.denoiser(
            hidden_states=noisy_latents, timestep=timesteps.to(dtype),
            encoder_hidden_states=conditioning["gemma2_hidden_states"].to(device, dtype),
            # cached masks come back as floats; Lumina counts the valid tokens of each caption from them
            encoder_attention_mask=conditioning["gemma2_attention_mask"].to(device).round().long(),
            return_dict=False,
        )[0]

    # ---- LoRA ---------------------------------------------------------------------------------------

    def lora_targets(self, components: ModelComponents) -> list[LoraTarget]:
        from library.models.lumina_checkpoint import diffusers_to_original_module

        gemma = components.text_encoders[0]
        return [
            LoraTarget(prefix="lora_unet", root=components.denoiser, container_classes=(BLOCK,),
                       rename=diffusers_to_original_module, fused_groups={BLOCK: (QKV_MEMBERS,)},
                       diffusers_prefix="transformer", save_format=self.settings.save_lora_format),
            LoraTarget(prefix="lora_te", root=gemma, container_classes=GEMMA_CONTAINERS, is_text_encoder=True,
                       save_format=self.settings.save_lora_format),
        ]

    def lora_file_layout(self) -> "LuminaLoraFileLayout":
        return LuminaLoraFileLayout(self.display_name)

    # ---- saving and sampling ------------------------------------------------------------------------

    def build_pipeline(self, components: ModelComponents, scheduler=None):
        from diffusers import Lumina2Pipeline

        from library.models.lumina_checkpoint import lumina_sampling_scheduler

        return Lumina2Pipeline(transformer=components.denoiser, scheduler=scheduler or lumina_sampling_scheduler(),
                               vae=components.vae, text_encoder=components.text_encoders[0],
                               tokenizer=components.tokenizers[0])

    def sampling_scheduler(self, components: ModelComponents, sampler: str):
        """Lumina 2 samples with flow-matching Euler (shift 6), whatever --ss says."""
        from library.models.lumina_checkpoint import lumina_sampling_scheduler

        return lumina_sampling_scheduler()

    def image_to_image_pipeline(self, pipeline):
        """diffusers has no Lumina 2 img2img pipeline: ours starts the txt2img one from a noised image."""
        from library.models.lumina_img2img import Lumina2Img2Img

        return Lumina2Img2Img(pipeline)

    def sample_pipeline_kwargs(self, prompt, args, components: ModelComponents) -> dict:
        kwargs = {"guidance_scale": 4.0 if prompt.scale is None else prompt.scale,
                  "max_sequence_length": self.max_length(args), "system_prompt": self.system_prompt(args)}
        if prompt.negative_prompt:
            kwargs["negative_prompt"] = prompt.negative_prompt
        return kwargs

    def unused_sample_options(self, prompt, components: ModelComponents) -> list[str]:
        unused = ["--ss"] if prompt.sample_sampler else []
        return unused + (["--g"] if prompt.guidance_scale is not None else [])

    def save_full_model(self, components: ModelComponents, path: str, save_as: str, dtype, metadata: dict) -> None:
        """The transformer only, as sd-scripts' lumina_train.py saves it: an original-layout single file;
        or a whole Lumina2Pipeline folder."""
        from library.models.lumina_checkpoint import save_lumina_transformer_original
        from library.models.saved_formats import save_pipeline_folder

        if save_as == "diffusers":
            save_pipeline_folder(self.build_pipeline(components), path, dtype)
            return
        save_lumina_transformer_original(components.denoiser, path, dtype, {k: str(v) for k, v in metadata.items()})


class LuminaLoraFileLayout(LoraFileLayout):
    """Lumina 2 LoRA names at the released model size, in each file layout."""

    def module_names(self) -> list[LoraModuleNames]:
        """Every unfused transformer linear LoRA may name at the released size (fused qkv: fused_module_names)."""
        from library.models.lumina_checkpoint import BLOCK_LINEARS

        names = []
        for block_list, count in RELEASED_SIZES.items():
            for i in range(count):
                for original, members in BLOCK_LINEARS.items():
                    if len(members) > 1 or (block_list == "context_refiner" and original.startswith("adaLN")):
                        continue
                    path = f"{block_list}.{i}.{original}"
                    names.append(LoraModuleNames(kohya="lora_unet_" + path.replace(".", "_"),
                                                 diffusers=f"transformer.{block_list}.{i}.{members[0]}",
                                                 comfy=f"diffusion_model.{path}"))
        return names

    def fused_module_names(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """kohya name of each fused qkv -> (its ComfyUI name, the diffusers modules it covers in row order)."""
        fused = {}
        for block_list, count in RELEASED_SIZES.items():
            for i in range(count):
                path = f"{block_list}.{i}.attention.qkv"
                fused["lora_unet_" + path.replace(".", "_")] = (
                    f"diffusion_model.{path}", tuple(f"transformer.{block_list}.{i}.{m}" for m in QKV_MEMBERS))
        return fused

    def fused_row_sizes(self, kohya_name: str, down, up) -> list[int]:
        """Rows of q, k and v in a fused qkv LoRA's up weight: q is the model width (the down's input)."""
        from library.models.lumina_checkpoint import qkv_row_sizes

        return qkv_row_sizes(int(up.shape[0]), int(down.shape[1]))
