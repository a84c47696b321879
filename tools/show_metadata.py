"""Print a .safetensors file's metadata and what its tensors are: a LoRA's family, layout, kinds, ranks and parts.

    python tools/show_metadata.py file.safetensors

Reads only the header of a checkpoint (instant even at 20 GB); a LoRA file is read whole.
sd-scripts' `ss_*` training metadata is listed first; values holding JSON are pretty-printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.tools_common import run_tool  # noqa: E402


SHOWN_ITEMS = 8  # entries of a long JSON list/object shown without --full


def _shorten(value, full: bool, depth: int = 0):
    """Long lists/objects nested in JSON metadata (peft's target_modules, ...) keep their first entries."""
    if isinstance(value, dict):
        items = [(k, _shorten(v, full, depth + 1)) for k, v in value.items()]
        if not full and depth and len(items) > SHOWN_ITEMS:
            items = items[:SHOWN_ITEMS] + [("...", f"{len(value) - SHOWN_ITEMS} more (--full shows all)")]
        return dict(items)
    if isinstance(value, list):
        items = [_shorten(v, full, depth + 1) for v in value]
        if not full and depth and len(items) > SHOWN_ITEMS:
            items = items[:SHOWN_ITEMS] + [f"... {len(value) - SHOWN_ITEMS} more (--full shows all)"]
        return items
    return value


def format_value(value: str, full: bool = False) -> str:
    text = value.strip()
    if text[:1] in "{[":
        try:
            return json.dumps(_shorten(json.loads(text), full), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    return value


def metadata_lines(metadata: dict[str, str], full: bool = False) -> list[str]:
    ordered = sorted(metadata, key=lambda key: (not key.startswith("ss_"), key))
    lines = []
    for key in ordered:
        value = format_value(metadata[key], full)
        if "\n" in value:
            lines.append(f"{key}:")
            lines.extend("    " + line for line in value.splitlines())
        else:
            lines.append(f"{key}: {value}")
    return lines


def lora_part(name: str, layout: str) -> str:
    """The model part a module belongs to: lora_unet / lora_te1 (kohya) or the first name segment."""
    if layout == "kohya":
        pieces = name.split("_")
        return "_".join(pieces[:2])
    return name.split(".", 1)[0]


def lora_summary_lines(header) -> list[str]:
    from library.lora_formats import LoraPair, detect_family, family_display_name, read_lora

    lora = read_lora(header.path)  # LoRA files are small; this also resolves diffusers' metadata alphas
    modules = lora.modules
    kinds = Counter(pair.label for pair in modules.values())
    ranks = Counter(str(pair.rank or "full") for pair in modules.values())
    alphas = Counter(pair.alpha_value() for pair in modules.values())
    parts = Counter(lora_part(name, lora.layout) for name in modules)
    conv = sum(1 for pair in modules.values()
               if isinstance(pair, LoraPair) and pair.down.dim() == 4 and pair.down.shape[-1] > 1)
    dtypes = Counter(info.dtype for info in header.tensors.values())
    return [
        f"LoRA: {family_display_name(detect_family(header.tensors))} family, {lora.layout} layout, {len(modules)} modules"
        + (f" ({conv} on 3x3 convolutions)" if conv else ""),
        "kind: " + ", ".join(f"{kind} ({count} modules)" for kind, count in sorted(kinds.items())),
        "rank: " + ", ".join(f"{rank} ({count} modules)" for rank, count in sorted(ranks.items())),
        "alpha: " + ", ".join(f"{alpha:g} ({count} modules)" for alpha, count in sorted(alphas.items())),
        "parts: " + ", ".join(f"{part} {count}" for part, count in sorted(parts.items())),
        "tensor dtypes: " + ", ".join(f"{dtype} {count}" for dtype, count in sorted(dtypes.items())),
    ]


def checkpoint_summary_lines(header) -> list[str]:
    from library.models.checkpoint_detect import checkpoint_display_name, detect_checkpoint_family

    family = detect_checkpoint_family(header.tensors)
    parameters = sum(info.nbytes for info in header.tensors.values())
    dtypes = Counter(info.dtype for info in header.tensors.values())
    return [f"not a LoRA: {len(header.tensors)} tensors, {parameters / 2**30:.2f} GiB of weights, "
            f"looks like {checkpoint_display_name(family)}",
            "tensor dtypes: " + ", ".join(f"{dtype} {count}" for dtype, count in sorted(dtypes.items()))]


def show_metadata(argv: list[str]) -> None:
    from library.lora_formats import split_key
    from library.safetensors_stream import read_header

    parser = argparse.ArgumentParser(description="Print a .safetensors file's metadata and a summary of its keys.")
    parser.add_argument("file", help=".safetensors file")
    parser.add_argument("--full", action="store_true", help="print long JSON metadata values in full")
    args = parser.parse_args(argv)
    header = read_header(args.file)
    lines = [f"file: {args.file}", "metadata:" if header.metadata else "metadata: (none)"]
    lines += ["  " + line for line in metadata_lines(header.metadata, args.full)]
    is_lora = header.tensors and any(split_key(key)[1] not in ("", "alpha") for key in header.tensors)
    lines += lora_summary_lines(header) if is_lora else checkpoint_summary_lines(header)
    print("\n".join(lines))


if __name__ == "__main__":
    run_tool(show_metadata)
