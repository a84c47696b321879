"""Convert a LoRA file between the kohya, diffusers (PEFT) and ComfyUI layouts, without loss.

    python tools/convert_lora.py in.safetensors out.safetensors --to kohya|diffusers|comfy [--family sd]

Tensors are only renamed; alphas move between `.alpha` tensors (kohya, comfy) and the
`lora_adapter_metadata` diffusers reads, so converting there and back gives the same file contents.
The family is detected from the key names unless --family (or --sdxl/--flux) is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.tools_common import add_family_arguments, run_tool  # noqa: E402

logger = logging.getLogger("convert_lora")


def build_parser() -> argparse.ArgumentParser:
    from library.lora_formats import LAYOUTS

    parser = argparse.ArgumentParser(description="Convert a LoRA file between kohya, diffusers and ComfyUI layouts.")
    parser.add_argument("input", help="LoRA file to read (.safetensors)")
    parser.add_argument("output", help="file to write")
    parser.add_argument("--to", required=True, choices=LAYOUTS, help="layout of the output")
    add_family_arguments(parser)
    return parser


def convert_lora(argv: list[str]) -> None:
    from library.errors import UserError
    from library.families import get_family
    from library.lora_formats import convert_lora_file, detect_family, read_tensors_and_metadata
    from library.tools_common import family_from_flags

    args = build_parser().parse_args(argv)
    name = family_from_flags(vars(args))
    if name is None:
        name = detect_family(read_tensors_and_metadata(args.input)[0])
        if name == "unknown":
            raise UserError(f"cannot tell which model {args.input} is for; give --family")
    family = get_family(name)
    lora = convert_lora_file(args.input, args.output, args.to, family)
    logger.info("%s (%s layout, %d modules) -> %s (%s layout)", args.input, lora.layout, len(lora.modules),
                args.output, args.to)


if __name__ == "__main__":
    run_tool(convert_lora)
