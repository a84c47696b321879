"""The network training flags (sd-scripts' names and meanings) and their validation.

`add_network_arguments` adds --network_module/--network_dim/--network_alpha/--network_dropout/
--network_args/--network_weights, the --network_train_*_only switches and the per-part learning
rates. `parse_network_args` turns `--network_args k=v ...` into a dict; `validate_network_args`
checks everything that can be checked before any model is loaded, so typos fail in a second.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from types import ModuleType

from library.errors import UserError, did_you_mean

# sd-scripts has one LoRA module per family; ours serves every family, so their names map to it
# and users' commands carry over.
NETWORK_MODULES = {
    "networks.lora": "networks.lora",
    "networks.lora_flux": "networks.lora",
    "networks.lora_sd3": "networks.lora",
    "networks.lora_lumina": "networks.lora",
    "lycoris.kohya": "networks.lycoris",  # LyCORIS' LoRA/LoHa/LoKr (+ DoRA), our implementation
}


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA network")
    add_lora_file_format_argument(group)
    group.add_argument("--network_module", default="networks.lora",
                       help="network to train: networks.lora (sd-scripts' networks.lora_flux/_sd3/_lumina also work) "
                            "or lycoris.kohya (LoHa, LoKr; --network_args algo=loha|lokr)")
    group.add_argument("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    group.add_argument("--network_alpha", type=float, default=1.0,
                       help="LoRA alpha: the update is scaled by alpha / rank (default 1; 0 means alpha = rank)")
    group.add_argument("--network_dropout", type=float, default=None,
                       help="dropout probability on the LoRA down projection's output while training")
    group.add_argument("--network_args", nargs="*", default=None, metavar="KEY=VALUE",
                       help="extra LoRA settings: conv_dim, conv_alpha, rank_dropout, module_dropout, "
                            "loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio, use_dora; per-block "
                            "(SD/SDXL): block_dims, block_alphas, conv_block_dims, conv_block_alphas, "
                            "down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold; family keys "
                            "(FLUX, SD3) in the family guides; lycoris.kohya also: algo, preset, factor, "
                            "decompose_both, dora_wd")
    group.add_argument("--network_weights", default=None,
                       help="LoRA file (.safetensors) to start from; its ranks and alphas must match the flags")
    group.add_argument("--network_train_unet_only", action="store_true",
                       help="train only the denoiser (UNet/transformer) LoRA")
    group.add_argument("--network_train_text_encoder_only", action="store_true",
                       help="train only the text encoder LoRA")
    group.add_argument("--unet_lr", type=float, default=None,
                       help="learning rate of the denoiser LoRA (default --learning_rate; 0 freezes it)")
    group.add_argument("--text_encoder_lr", type=float, nargs="+", default=None, metavar="LR",
                       help="learning rate of the text encoder LoRA (default --learning_rate; 0 freezes it); one value "
                            "per text encoder as sd-scripts (SDXL: TE1 TE2; FLUX: CLIP-L T5; SD3: CLIP-L CLIP-G T5), "
                            "a single value for all")
    for index in (1, 2, 3):
        group.add_argument(f"--text_encoder_lr{index}", type=float, default=None, metavar="LR",
                           help=f"learning rate of text encoder {index} alone (the spelling of sd-scripts' SDXL guide; "
                                "the others take --text_encoder_lr, else --learning_rate)")


def resolve_numbered_text_encoder_lrs(args: argparse.Namespace) -> None:
    """--text_encoder_lr1/2/3 become the per-encoder --text_encoder_lr list; unnamed encoders before the
    last one given take --text_encoder_lr (one value), else --learning_rate."""
    numbered = [getattr(args, f"text_encoder_lr{index}") for index in (1, 2, 3)]
    if all(value is None for value in numbered):
        return
    if args.text_encoder_lr is not None and len(args.text_encoder_lr) > 1:
        raise UserError("--text_encoder_lr with several values and --text_encoder_lr1/2/3 both set per-encoder "
                        "learning rates; keep one spelling")
    fallback = args.text_encoder_lr[0] if args.text_encoder_lr else args.learning_rate
    last = max(index for index, value in enumerate(numbered) if value is not None)
    args.text_encoder_lr = [fallback if value is None else value for value in numbered[:last + 1]]


def add_lora_file_format_argument(group) -> None:
    group.add_argument("--save_model_as", choices=["safetensors", "ckpt", "pt"], default="safetensors",
                       help="file format of the LoRA: safetensors (the only one written; ckpt/pt are refused)")


def parse_network_args(entries: list[str] | None) -> dict[str, str]:
    """["conv_dim=4", "conv_alpha=1"] -> {"conv_dim": "4", "conv_alpha": "1"}."""
    parsed: dict[str, str] = {}
    for entry in entries or []:
        key, sep, value = str(entry).partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UserError(f"--network_args entry `{entry}` is not of the form key=value (e.g. conv_dim=4)")
        if key in parsed and parsed[key] != value:
            raise UserError(f"--network_args gives `{key}` twice ({parsed[key]} and {value}); keep one")
        parsed[key] = value
    return parsed


def family_network_args(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, str]:
    """The --network_args entries a model family reads itself (its `network_arg_keys`)."""
    parsed = parse_network_args(getattr(args, "network_args", None))
    return {k: v for k, v in parsed.items() if k in keys}


def parse_block_selection(key: str, text: str) -> set[int] | None:
    """A block-index selection (sd-scripts' train_*_block_indices): "all" -> None (every block),
    "none"/"" -> empty, "0-3,7" -> {0, 1, 2, 3, 7}."""
    text = text.strip()
    if text == "all":
        return None
    chosen: set = set()
    for part in filter(None, (p.strip() for p in text.split(",") if text != "none")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise UserError(f"--network_args {key}={text}: use all, none or indices and ranges like 0-3,7")
        chosen.update(range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1))
    return chosen


def import_network_module(name: str) -> ModuleType:
    """The Python module implementing --network_module (it provides create_network)."""
    if name not in NETWORK_MODULES:
        raise UserError(f"--network_module {name} is not supported{did_you_mean(name, NETWORK_MODULES)}; "
                        "use networks.lora (or lycoris.kohya for LoHa/LoKr)")
    return importlib.import_module(NETWORK_MODULES[name])


def create_network_kwargs(args: argparse.Namespace, family_keys: tuple[str, ...] = ()) -> dict:
    """The keyword arguments of create_network(targets, **kwargs) that come from the flags; the
    --network_args keys in `family_keys` belong to the model family (its LoraTarget) and are left out."""
    network_args = {k: v for k, v in parse_network_args(args.network_args).items() if k not in family_keys}
    return {
        "network_dim": args.network_dim,
        "network_alpha": args.network_alpha,
        "network_dropout": args.network_dropout,
        "network_args": network_args,
        "train_unet": not args.network_train_text_encoder_only,
        "train_text_encoder": not args.network_train_unet_only,
    }


def validate_network_args(args: argparse.Namespace, family_keys: tuple[str, ...] = ()) -> None:
    """Reject contradictory or ineffective network flags before any model is loaded."""
    module = import_network_module(args.network_module)
    if args.save_model_as != "safetensors":
        raise UserError(f"--save_model_as {args.save_model_as}: LoRA files are written as safetensors only (pickled "
                        ".ckpt/.pt files can run code when loaded); use --save_model_as safetensors or drop the flag")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.network_train_unet_only and args.text_encoder_lr is not None:
        raise UserError("--text_encoder_lr has no effect with --network_train_unet_only; drop one of them")
    if args.network_train_text_encoder_only and args.unet_lr is not None:
        raise UserError("--unet_lr has no effect with --network_train_text_encoder_only; drop one of them")
    for flag in ("unet_lr", "text_encoder_lr"):
        values = getattr(args, flag)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < 0:
                raise UserError(f"--{flag} must not be negative (got {value})")
    if args.network_weights is not None and not os.path.isfile(args.network_weights):
        raise UserError(f"--network_weights {args.network_weights} does not exist")
    kwargs = create_network_kwargs(args, family_keys)
    module.parse_lora_options(kwargs["network_dim"], kwargs["network_alpha"], kwargs["network_dropout"],
                              kwargs["network_args"])
