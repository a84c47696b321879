"""The dataset command-line flags, with sd-scripts' names and meanings.

Every dataset option flag defaults to None so `library/config/dataset_config.py` can tell a flag the
user passed (on the command line or in a `--config_file`) from one left alone: without
`--dataset_config` the passed flags become the dataset options, with it they are the lowest-priority
defaults under its [general] section (as in sd-scripts); the folder flags are an error there. The built-in default of each option is the default of the matching
field in `library/config/dataset_spec.py` and is shown in the help text.
"""

from __future__ import annotations

import argparse

# Flags whose config-file key differs from the flag name (sd-scripts' mapping).
FLAG_TO_CONFIG_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}

# sd-scripts' resize_interpolation names (its --resize_interpolation choices).
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def parse_resolution(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '512,768' -> (512, 768) as (width, height)."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "512" or "width,height" like "512,768", got {text!r}') from None
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f'expected "512" or "width,height" like "512,768", got {text!r}')
    return (sizes[0], sizes[-1])


# Dataset option flags, in help order: (flag name, argparse keyword arguments). All default to None.
_OPTION_FLAGS: list[tuple[str, dict]] = [
    ("resolution", dict(type=parse_resolution, metavar="SIZE",
                        help='training resolution: "512" or "width,height" like "512,768" (default: 512)')),
    ("train_batch_size", dict(type=int, help="batch size (default: 1)")),
    ("caption_extension", dict(help='extension of caption files (default: ".caption")')),
    ("shuffle_caption", dict(action="store_true", help="shuffle the comma-separated tags of captions")),
    ("keep_tokens", dict(type=int, help="keep the first N tags in place when shuffling or dropping (default: 0)")),
    ("keep_tokens_separator", dict(
        help='caption parts before the first and after the second such separator (e.g. "|||") stay fixed')),
    ("caption_separator", dict(help='separator between tags (default: ",")')),
    ("secondary_separator", dict(help='separator of tags that shuffle and drop as one (e.g. ";;;")')),
    ("enable_wildcard", dict(action="store_true",
                             help="{a|b} picks one option; a multi-line caption picks one line")),
    ("caption_prefix", dict(help="text prepended to every caption")),
    ("caption_suffix", dict(help="text appended to every caption")),
    ("caption_dropout_rate", dict(type=float, help="probability of training on an empty caption (default: 0)")),
    ("caption_dropout_every_n_epochs", dict(type=int, help="use empty captions every N epochs (default: 0 = never)")),
    ("caption_tag_dropout_rate", dict(type=float, help="probability of dropping each tag (default: 0)")),
    ("token_warmup_min", dict(type=int, help="tags used at the start of token warmup (default: 1)")),
    ("token_warmup_step", dict(
        type=float, help="steps (or fraction of training if < 1) until all tags are used (default: 0 = off)")),
    ("flip_aug", dict(action="store_true", help="random horizontal flips")),
    ("color_aug", dict(action="store_true", help="random hue shifts (not with latent caching)")),
    ("random_crop", dict(action="store_true", help="random instead of centred crops (not with latent caching)")),
    ("alpha_mask", dict(action="store_true", help="use the alpha channel of images as the loss mask")),
    ("resize_interpolation", dict(
        choices=RESIZE_INTERPOLATIONS,
        help="filter that resizes images to their bucket (default: area when shrinking, else lanczos)")),
    ("dataset_repeats", dict(
        type=int, help="repeats of each image where the subset gives none, e.g. with --in_json (default: 1)")),
    ("enable_bucket", dict(action="store_true", help="aspect-ratio bucketing")),
    ("min_bucket_reso", dict(type=int, help="smallest bucket side (default: 256)")),
    ("max_bucket_reso", dict(type=int, help="largest bucket side (default: 1024)")),
    ("bucket_reso_steps", dict(type=int, help="bucket sides are multiples of this (default: 64)")),
    ("bucket_no_upscale", dict(action="store_true", help="never upscale images to fill a bucket")),
    ("trigger_word", dict(help="replaces `[trigger]` in captions and sample prompts")),
    ("caption_from_path", dict(
        action="store_true",
        help='build captions from folder names under each image folder ("long_hair" -> "long hair")')),
]

# Flags that describe where the images are (only without --dataset_config).
FOLDER_FLAGS = ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")

DATASET_OPTION_FLAGS = tuple(name for name, _ in _OPTION_FLAGS)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset_config", default=None, metavar="FILE",
                       help="dataset config file (.toml or .json, sd-scripts' [general]/[[datasets]] schema)")
    group.add_argument("--train_data_dir", default=None, metavar="FOLDER",
                       help="folder of `N_class tokens` subfolders (N = repeats), used without --dataset_config")
    group.add_argument("--reg_data_dir", default=None, metavar="FOLDER",
                       help="folder of regularisation `N_class tokens` subfolders, used without --dataset_config")
    group.add_argument("--in_json", default=None, metavar="FILE",
                       help="fine-tuning metadata JSON (image -> caption/tags, sd-scripts' format) for the images "
                            "in --train_data_dir, used without --dataset_config")
    group.add_argument("--conditioning_data_dir", default=None, metavar="FOLDER",
                       help="folder of loss masks for --masked_loss (same file names as the images), used "
                            "without --dataset_config")
    for name, options in _OPTION_FLAGS:
        if options.get("action") != "store_true" and "metavar" not in options:
            options = {**options, "metavar": {int: "N", float: "X"}.get(options.get("type"), "TEXT")}
        group.add_argument(f"--{name}", default=None, **options)


def config_key_for_flag(flag_name: str) -> str:
    return FLAG_TO_CONFIG_KEY.get(flag_name, flag_name)


def flag_for_config_key(config_key: str) -> str:
    for flag, key in FLAG_TO_CONFIG_KEY.items():
        if key == config_key:
            return flag
    return config_key


def passed_dataset_flags(args: argparse.Namespace) -> list[str]:
    """Names of the dataset flags the user set (on the command line or in --config_file)."""
    names = FOLDER_FLAGS + DATASET_OPTION_FLAGS
    return [name for name in names if getattr(args, name, None) is not None]
