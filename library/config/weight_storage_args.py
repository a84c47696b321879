"""The flags that store frozen base weights in fp8, int8 or nf4, and their checks (every family, both modes).

`--fp8_base` / `--fp8_base_unet` keep sd-scripts' meaning: fp8 for the denoiser and the large text encoders
(T5-XXL, Gemma-2) or for the denoiser only. `--base_weights_dtype fp8|int8|nf4` and
`--text_encoder_weights_dtype fp8|int8|nf4` are ours: the denoiser's and the large text encoders' storage.
`WeightStorage.from_args` validates them once for a family and mode; library/quantized_base.py does the storing.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from library.errors import UserError

STORAGE_CHOICES = ("fp8", "int8", "nf4")


def add_weight_storage_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("frozen base weights in fp8 / int8 / nf4")
    group.add_argument("--fp8_base", action="store_true",
                       help="store the frozen denoiser and large text encoders (T5-XXL, Gemma-2) in float8_e4m3fn "
                            "(sd-scripts' flag; = --base_weights_dtype fp8 --text_encoder_weights_dtype fp8)")
    group.add_argument("--fp8_base_unet", action="store_true",
                       help="store only the frozen denoiser (UNet / transformer) in float8_e4m3fn (sd-scripts' flag)")
    group.add_argument("--base_weights_dtype", choices=STORAGE_CHOICES, default=None,
                       help="storage of the frozen denoiser's Linear weights: fp8, int8 (per-row absmax) or nf4 "
                            "(4-bit NormalFloat, QLoRA); computed in the mixed-precision dtype. LoRA training only")
    group.add_argument("--text_encoder_weights_dtype", choices=STORAGE_CHOICES, default=None,
                       help="storage of the large text encoders' Linear weights (T5-XXL for FLUX.1/SD3, Gemma-2 for "
                            "Lumina 2) when their outputs are not cached")


@dataclass(frozen=True)
class WeightStorage:
    """Validated storage of the frozen weights: None keeps the training dtype."""

    denoiser: Optional[str] = None
    text_encoders: Optional[str] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, kind, family) -> "WeightStorage":
        denoiser = _denoiser_storage(args)
        if denoiser and kind.is_full_fine_tune:
            raise UserError(f"{_denoiser_flag(args)} stores the frozen denoiser in {denoiser}, but a full fine-tune "
                            "trains those weights; drop it (it is for LoRA training)")
        text_encoders = _text_encoder_storage(args, family)
        if text_encoders and kind.is_full_fine_tune:
            raise UserError(f"--text_encoder_weights_dtype {text_encoders}: a full fine-tune saves its text encoders "
                            "with the model, in the training dtype; drop it (it is for LoRA training)")
        return cls(denoiser=denoiser, text_encoders=text_encoders)


def _denoiser_flag(args) -> str:
    if args.base_weights_dtype:
        return f"--base_weights_dtype {args.base_weights_dtype}"
    return "--fp8_base" if args.fp8_base else "--fp8_base_unet"


def _denoiser_storage(args) -> Optional[str]:
    fp8_flag = args.fp8_base or args.fp8_base_unet
    if fp8_flag and args.base_weights_dtype not in (None, "fp8"):
        raise UserError(f"--fp8_base/--fp8_base_unet ask for fp8 but --base_weights_dtype is "
                        f"{args.base_weights_dtype}; keep only one of them")
    return "fp8" if fp8_flag else args.base_weights_dtype


def _text_encoder_storage(args, family) -> Optional[str]:
    cached = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
    explicit = args.text_encoder_weights_dtype
    if explicit and not family.large_text_encoders:
        raise UserError(f"--text_encoder_weights_dtype: {family.display_name} has no large text encoder to store "
                        "(it applies to T5-XXL and Gemma-2); drop it")
    if explicit and cached:
        raise UserError("--text_encoder_weights_dtype has no effect with --cache_text_encoder_outputs: the text "
                        "encoders do not run while training; drop one of the two")
    if explicit:
        return explicit
    return "fp8" if args.fp8_base and family.large_text_encoders and not cached else None
