"""Bake LoRAs into a checkpoint, or merge several LoRAs into one.

    python tools/merge_lora.py --family sd --model model.safetensors --loras a.safetensors b.safetensors \
        --ratios 0.8 0.5 --save_to merged.safetensors [--save_precision fp16|bf16|float] [--device cuda]
    python tools/merge_lora.py --loras a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors \
        (--concat | --new_rank 32 [--new_conv_rank 8])

The checkpoint (a single file, kept in its layout, or a diffusers folder) is streamed one tensor at
a time, so memory stays near the largest tensor plus the LoRAs. LoRAs may be in kohya, diffusers or
ComfyUI layout. Without --model, the LoRAs become one LoRA: --concat is exact (ranks add up), else
the summed update is truncated by SVD to --new_rank.

sd-scripts' merge_lora.py / sdxl_merge_lora.py / flux_merge_lora.py command lines work as they are:
--sd_model and --flux_model (which selects FLUX) name the checkpoint, --models the LoRAs, --clip_l /
--t5xxl with --clip_l_save_to / --t5xxl_save_to the FLUX text encoders, --working_device the device;
their other flags are accepted or refused by library/config/sd_scripts_compat.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.tools_common import add_family_arguments, choose_family_name, run_tool  # noqa: E402

logger = logging.getLogger("merge_lora")


def build_parser() -> argparse.ArgumentParser:
    from library.config.sd_scripts_compat import (MERGE_LORA_ACCEPTED, MERGE_LORA_REFUSED, add_accepted_flags,
                                                   add_refused_flags)

    parser = argparse.ArgumentParser(description="Merge LoRAs into a checkpoint, or into one LoRA.")
    add_family_arguments(parser)
    parser.add_argument("--model", "--sd_model", dest="model", default=None,
                        help="checkpoint to merge into: a .safetensors single file or a diffusers model folder "
                             "(without it, the LoRAs are merged into one LoRA)")
    parser.add_argument("--flux_model", default=None, help="FLUX checkpoint to merge into (same as --family flux --model)")
    parser.add_argument("--loras", "--models", dest="loras", nargs="+", default=None, metavar="FILE",
                        help="LoRA files (kohya, diffusers or comfy)")
    parser.add_argument("--ratios", nargs="+", type=float, default=None, metavar="R",
                        help="one multiplier per LoRA (default: 1.0 each)")
    parser.add_argument("--save_to", default=None, help="output file (or folder for a diffusers model)")
    parser.add_argument("--text_encoders", nargs="+", default=[], metavar="FILE",
                        help="text-encoder files of families that keep them apart (FLUX: clip_l.safetensors "
                             "[t5xxl_fp16.safetensors]), to merge text-encoder LoRA modules into")
    parser.add_argument("--save_text_encoders_to", nargs="+", default=[], metavar="FILE",
                        help="where the merged --text_encoders go, in the same order")
    for encoder in ("clip_l", "t5xxl"):
        parser.add_argument(f"--{encoder}", default=None, help=f"FLUX {encoder} file to merge into (sd-scripts' name; "
                                                               "same as listing it in --text_encoders)")
        parser.add_argument(f"--{encoder}_save_to", default=None, help=f"where the merged --{encoder} goes")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                        help="dtype of floating-point tensors written (default: as in the input)")
    parser.add_argument("--device", "--working_device", dest="device", default="cpu",
                        help="where the merge arithmetic runs, e.g. cuda (default: cpu)")
    parser.add_argument("--concat", action="store_true", help="LoRA merge: concatenate ranks (exact)")
    parser.add_argument("--new_rank", type=int, default=None, help="LoRA merge: rank of the SVD result")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="LoRA merge: rank of 3x3-conv modules in the SVD result (default: --new_rank)")
    add_accepted_flags(parser, MERGE_LORA_ACCEPTED)
    add_refused_flags(parser, MERGE_LORA_REFUSED)
    return parser


def _resolve_sd_scripts_names(args: argparse.Namespace) -> None:
    """--flux_model, --clip_l/--t5xxl and their --*_save_to become --model, --text_encoders, --save_text_encoders_to."""
    from library.errors import UserError

    if args.flux_model:
        if args.model:
            raise UserError("--flux_model and --model/--sd_model both name the checkpoint; keep one")
        args.model = args.flux_model
    for encoder in ("clip_l", "t5xxl"):
        source, target = getattr(args, encoder), getattr(args, f"{encoder}_save_to")
        if bool(source) != bool(target):
            raise UserError(f"--{encoder} and --{encoder}_save_to go together (the file to merge into, and where "
                            "the merged copy goes)")
        if source:
            args.text_encoders.append(source)
            args.save_text_encoders_to.append(target)
    missing = [flags for flags, value in (("--loras (or --models)", args.loras), ("--save_to", args.save_to))
               if not value]
    if missing:
        raise UserError(f"missing {' and '.join(missing)}: give the LoRA files to merge and the output file")


def _check_options(args: argparse.Namespace) -> None:
    from library.errors import UserError

    if args.model is None and (args.text_encoders or args.save_text_encoders_to):
        raise UserError("--text_encoders merge into a checkpoint's text encoders: also give --model")
    if args.model is not None:
        given = [f"--{name}" for name in ("new_rank", "new_conv_rank") if getattr(args, name) is not None]
        given += ["--concat"] if args.concat else []
        if given:
            raise UserError(f"{', '.join(given)} only apply when merging LoRAs into one LoRA (without --model)")
    for name in ("new_rank", "new_conv_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")


def merge_lora(argv: list[str]) -> None:
    from library import lora_merge
    from library.families import get_family
    from library.devices import torch_dtype

    from library.config.config_file import parse_args_with_config_file
    from library.config.sd_scripts_compat import MERGE_LORA_ACCEPTED, report_accepted_flags

    args = parse_args_with_config_file(build_parser(), argv)
    report_accepted_flags(args, MERGE_LORA_ACCEPTED)
    _resolve_sd_scripts_names(args)
    _check_options(args)
    family = get_family(_family_name(args, argv))
    inputs = args.loras + args.text_encoders + ([args.model] if args.model else [])
    for output in [args.save_to, *args.save_text_encoders_to]:
        lora_merge.check_paths(inputs, output)
    loras = lora_merge.load_loras(args.loras, args.ratios, family)
    started = time.time()
    if args.model:
        text_encoders = lora_merge.separate_text_encoder_files(family, args.text_encoders, args.save_text_encoders_to,
                                                               args.model)
        changed = lora_merge.merge_into_checkpoint(family, args.model, loras, args.save_to, args.save_precision,
                                                   args.device, text_encoders)
        logger.info("merged %d LoRAs into %d tensors of %s in %.1f s: %s", len(loras), changed, args.model,
                    time.time() - started, args.save_to)
        return
    from library.lora_formats import write_lora, from_kohya

    dtype = torch_dtype(args.save_precision) if args.save_precision else None
    merged = lora_merge.merge_loras(loras, args.concat, args.new_rank, args.new_conv_rank, args.device, dtype)
    metadata = lora_merge.merged_lora_metadata(loras, merged, "concat" if args.concat else "svd")
    tensors, metadata = from_kohya(merged, "kohya", family, metadata)
    write_lora(args.save_to, tensors, metadata, "kohya")
    logger.info("merged %d LoRAs into one LoRA of %d modules: %s", len(loras), len(merged), args.save_to)


def _family_name(args: argparse.Namespace, argv: list[str]) -> str:
    from library.errors import UserError
    from library.tools_common import family_from_flags

    chosen = family_from_flags(vars(args))
    if args.flux_model:
        if chosen not in (None, "flux"):
            raise UserError(f"--flux_model names a FLUX checkpoint, but the family chosen is {chosen}")
        return "flux"
    return chosen or choose_family_name(argv)


if __name__ == "__main__":
    run_tool(merge_lora)
