"""Turns `--dataset_config` (TOML or JSON, sd-scripts' schema) or the `--train_data_dir` folder
convention into a `DatasetGroupSpec` with every cascading default applied.

The file holds `[general]` (any dataset or subset option), `[[datasets]]` (dataset options, plus
subset options as defaults for its subsets) and `[[datasets.subsets]]` (subset options); a subset
option is taken from the subset, else its dataset, else `[general]`, else the built-in default (the
field default in `dataset_spec.py`). Values are validated with voluptuous, one schema per level, and
every mistake becomes a `UserError` naming the file, the key path (`datasets[0].subsets[1].num_repeat`)
and the closest valid key. sd-scripts options we do not implement are rejected by name with the
reason, never ignored; `cache_info` (sd-scripts' cache of image sizes, a start-up speed option) is
accepted and does nothing here, since sizes come from the image headers. Without a config file, each
`N_class tokens` subfolder of `--train_data_dir` (and `--reg_data_dir`) is a DreamBooth subset with N
repeats, or with `--in_json` the folder and the metadata file form one fine-tuning subset
(sd-scripts' fine_tune.py workflow); the dataset flags give the options and `--conditioning_data_dir`
the loss masks of every subset.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import voluptuous as vol

from library.config.config_file import load_toml
from library.config.dataset_args import (
    DATASET_OPTION_FLAGS,
    FOLDER_FLAGS,
    RESIZE_INTERPOLATIONS,
    config_key_for_flag,
    flag_for_config_key,
    passed_dataset_flags,
)
from library.config.dataset_spec import CaptionOptions, DatasetGroupSpec, DatasetSpec, SubsetSpec
from library.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)


# --- value validators (voluptuous calls them; their message says what was expected) ---

def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise vol.Invalid("expected true or false")
    return value


def _text(non_empty: bool = False) -> Callable[[Any], str]:
    def validate(value: Any) -> str:
        if not isinstance(value, str):
            raise vol.Invalid("expected a string")
        if non_empty and not value:
            raise vol.Invalid("must not be empty")
        return value

    return validate


def _integer(minimum: int) -> Callable[[Any], int]:
    def validate(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise vol.Invalid("expected an integer")
        if value < minimum:
            raise vol.Invalid(f"must be at least {minimum}")
        return value

    return validate


def _number(minimum: float, maximum: float | None = None) -> Callable[[Any], float]:
    def validate(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise vol.Invalid("expected a number")
        if value < minimum or (maximum is not None and value > maximum):
            raise vol.Invalid(f"must be between {minimum} and {maximum}" if maximum is not None
                              else f"must be at least {minimum}")
        return float(value)

    return validate


def _validation_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise vol.Invalid("expected a number from 0 to 1 (1 = the whole dataset is validation data, "
                          "which is_validation = true in its [[datasets]] also says)")
    return float(value)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def validate(value: Any) -> str:
        if value not in choices:
            raise vol.Invalid(f"expected one of {', '.join(choices)}{did_you_mean(str(value), choices)}")
        return value

    return validate


def _resolution(value: Any) -> tuple[int, int]:
    """An int (square) or [width, height]."""
    sizes = [value] if not isinstance(value, (list, tuple)) else list(value)
    if len(sizes) not in (1, 2) or any(isinstance(size, bool) or not isinstance(size, int) for size in sizes):
        raise vol.Invalid("expected an integer or [width, height]")
    if min(sizes) < 1:
        raise vol.Invalid("sizes must be at least 1")
    return (sizes[0], sizes[-1])


# --- which option is allowed where ---

CAPTION_OPTIONS = {
    "caption_prefix": _text(), "caption_suffix": _text(), "shuffle_caption": _boolean,
    "keep_tokens": _integer(0), "keep_tokens_separator": _text(), "caption_separator": _text(non_empty=True),
    "secondary_separator": _text(non_empty=True), "enable_wildcard": _boolean,
    "caption_dropout_rate": _number(0.0, 1.0), "caption_dropout_every_n_epochs": _integer(0),
    "caption_tag_dropout_rate": _number(0.0, 1.0), "token_warmup_min": _integer(0),
    "token_warmup_step": _number(0.0), "trigger_word": _text(non_empty=True),
}
# Subset options that may also be written in [general] or [[datasets]] as defaults.
SUBSET_OPTIONS = {
    **CAPTION_OPTIONS, "num_repeats": _integer(1), "flip_aug": _boolean, "random_crop": _boolean,
    "color_aug": _boolean, "alpha_mask": _boolean, "caption_from_path": _boolean,
    "caption_extension": _text(), "class_tokens": _text(), "resize_interpolation": _one_of(RESIZE_INTERPOLATIONS),
    "cache_info": _boolean,
}
SUBSET_ONLY_OPTIONS = {"image_dir": _text(non_empty=True), "metadata_file": _text(non_empty=True), "is_reg": _boolean,
                       "conditioning_data_dir": _text(non_empty=True)}
DATASET_OPTIONS = {
    "resolution": _resolution, "batch_size": _integer(1), "enable_bucket": _boolean,
    "min_bucket_reso": _integer(1), "max_bucket_reso": _integer(1), "bucket_reso_steps": _integer(1),
    "bucket_no_upscale": _boolean, "validation_split": _validation_fraction, "validation_seed": _integer(0),
}
# Validation options that are also command-line flags (library/training/validation.py), like the dataset flags.
VALIDATION_FLAGS = ("validation_split", "validation_seed")
# Options about caption files and folders: they mean nothing for fine-tuning (metadata_file) subsets.
DREAMBOOTH_ONLY_OPTIONS = ("is_reg", "class_tokens", "caption_extension", "caption_from_path")
# Options accepted for sd-scripts' sake that change nothing here: (option, what the log says once).
WITHOUT_EFFECT_OPTIONS = {
    "cache_info": "cache_info: image sizes are read from the image headers at every start (fast), so there is "
                  "no size cache to write; the option has no effect here",
}
# sd-scripts accepts these in dataset files; we reject them by name, with the reason, rather than ignore them.
UNSUPPORTED_SD_SCRIPTS_OPTIONS = {
    "face_crop_aug_range": "sd-scripts reads face positions from file names (name_cx_cy_w_h.png) to crop around "
                           "faces; that is not implemented here: crop the images beforehand, or use random_crop",
    "custom_attributes": "it passes per-subset attributes to sd-scripts' own model code; nothing here reads them",
    "network_multiplier": "per-dataset LoRA strength is not implemented",
    "system_prompt": "per-dataset system prompts are not implemented; Lumina 2 takes --system_prompt on the command line",
    "skip_image_resolution": "skipping images by resolution is not implemented",
}
# Command-line names sometimes written as dataset keys: (key, the key to use).
COMMAND_LINE_NAMES = {"in_json": "metadata_file", "train_data_dir": "image_dir", "dataset_repeats": "num_repeats",
                      "train_batch_size": "batch_size", "reg_data_dir": "image_dir with is_reg = true"}
TOP_LEVEL_SECTIONS = ("general", "datasets")

LEVEL_OPTIONS = {
    "general": {**DATASET_OPTIONS, **SUBSET_OPTIONS},
    "dataset": {**DATASET_OPTIONS, **SUBSET_OPTIONS, "subsets": object, "is_validation": _boolean},
    "subset": {**SUBSET_OPTIONS, **SUBSET_ONLY_OPTIONS},
}
LEVEL_SCHEMAS = {level: vol.Schema(options) for level, options in LEVEL_OPTIONS.items()}
_CAPTION_FIELDS = {spec_field.name for spec_field in fields(CaptionOptions)}


@dataclass
class _Source:
    """Where options came from, and how to name a key path in messages."""

    name: str  # the file, or "<command line>"
    describe: Callable[[list], str]  # a key path as the user wrote it
    option_name: Callable[[str], str] = str  # an option as the user wrote it (a key, or a --flag)

    def error(self, path: list, message: str) -> UserError:
        where = self.describe(path)
        return UserError(f"{self.name}: {where}: {message}" if where else f"{self.name}: {message}")


def format_key_path(path: list) -> str:
    """['datasets', 0, 'subsets', 1, 'num_repeats'] -> 'datasets[0].subsets[1].num_repeats'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe_cli_path(path: list) -> str:
    """Options from the command line are named by their flag; the one dataset needs no name."""
    if len(path) == 2 and path[0] == "general":
        return f"--{flag_for_config_key(path[1])}"
    if path[-1] in _FOLDER_FLAG_OF_KEY:
        return _FOLDER_FLAG_OF_KEY[path[-1]]
    return "" if path == ["datasets", 0] else format_key_path(path)


# Subset keys the folder flags fill in, for messages about the command line.
_FOLDER_FLAG_OF_KEY = {"metadata_file": "--in_json", "image_dir": "--train_data_dir",
                       "conditioning_data_dir": "--conditioning_data_dir"}


# --- public entry point ---

def load_dataset_group(args: argparse.Namespace) -> DatasetGroupSpec:
    """The datasets of a run, from `--dataset_config` or from `--train_data_dir`/`--reg_data_dir`.

    With a config file, dataset flags given on the command line (e.g. --train_batch_size) are the
    lowest-priority defaults under its [general] section, as in sd-scripts.
    """
    config_file = getattr(args, "dataset_config", None)
    if config_file is None:
        return _load_from_folders(args)
    _reject_folder_flags(args, str(config_file))
    source = _Source(str(config_file), format_key_path)
    document = _validate_document(_read_config_file(str(config_file)), source)
    document["general"] = {**_command_line_defaults(args), **document["general"]}
    return _build_group(document, source)


def _command_line_defaults(args: argparse.Namespace) -> dict:
    given = _passed_option_flags(args)
    source = _Source("<command line>", _describe_cli_path, lambda key: f"--{flag_for_config_key(key)}")
    return _validate_document({"general": given, "datasets": []}, source)["general"]


def _passed_option_flags(args: argparse.Namespace) -> dict:
    """The dataset (and validation split) flags the user passed, as config keys."""
    return {config_key_for_flag(name): getattr(args, name) for name in DATASET_OPTION_FLAGS + VALIDATION_FLAGS
            if getattr(args, name, None) is not None}


def _reject_folder_flags(args: argparse.Namespace, config_file: str) -> None:
    passed = [name for name in passed_dataset_flags(args) if name in FOLDER_FLAGS]
    if passed:
        flags = ", ".join(f"--{name}" for name in passed)
        raise UserError(f"--dataset_config {config_file} defines the image folders, so {flags} would be ignored: "
                        "list them as [[datasets.subsets]] image_dir (is_reg = true for regularisation) "
                        "and remove the flags")


def _read_config_file(path: str) -> Any:
    suffix = Path(path).suffix.lower()
    if suffix == ".toml":
        return load_toml(path)
    if suffix != ".json":
        kind = suffix or "(no extension)"
        raise UserError(f"{path}: unknown dataset config format {kind}: use a .toml or .json file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read the file as UTF-8 text ({error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise UserError(f"{path}: JSON syntax error at {where}: {error.msg}") from None


# --- validation: every level against its schema, all problems reported together ---

def _validate_document(document: Any, source: _Source) -> dict:
    if not isinstance(document, dict):
        raise source.error([], 'expected an object with "general" and "datasets"')
    problems: list[str] = []
    for key in document:
        if key not in TOP_LEVEL_SECTIONS:
            problems.append(_explain_unknown_key(key, "top", [key]))
    general = _validate_table(document.get("general", {}), "general", ["general"], source, problems)
    datasets = []
    for index, dataset in _tables_in(document, "datasets", ["datasets"], problems):
        path = ["datasets", index]
        checked = _validate_table(dataset, "dataset", path, source, problems)
        checked["subsets"] = [_validate_table(subset, "subset", path + ["subsets", number], source, problems)
                              for number, subset in _tables_in(dataset, "subsets", path + ["subsets"], problems)]
        datasets.append(checked)
    if problems:
        raise UserError(f"{source.name}: {problems[0]}" if len(problems) == 1
                        else f"{source.name}: {len(problems)} problems:\n  " + "\n  ".join(problems))
    return {"general": general, "datasets": datasets}


def _tables_in(parent: dict, key: str, path: list, problems: list[str]) -> list[tuple[int, dict]]:
    """The [[key]] tables of `parent` with their indexes; a wrong shape is added to `problems`."""
    value = parent.get(key, [])
    header = "[[" + ".".join(part for part in path if isinstance(part, str)) + "]]"
    if not isinstance(value, list):
        found = "a single table" if isinstance(value, dict) else repr(value)
        problems.append(f"{format_key_path(path)}: expected a list of {header} tables (double brackets), got {found}")
        return []
    tables = []
    for index, item in enumerate(value):
        if isinstance(item, dict):
            tables.append((index, item))
        else:
            problems.append(f"{format_key_path(path + [index])}: expected a {header} table, got {item!r}")
    return tables


def _validate_table(table: Any, level: str, path: list, source: _Source, problems: list[str]) -> dict:
    if not isinstance(table, dict):
        problems.append(f"{source.describe(path)}: expected a table of options, got {table!r}")
        return {}
    try:
        return LEVEL_SCHEMAS[level](table)
    except vol.MultipleInvalid as invalid:
        for error in invalid.errors:
            key_path = path + list(error.path)
            key = error.path[-1]
            if error.error_message == "extra keys not allowed":
                problems.append(_explain_unknown_key(key, level, key_path))
            else:
                problems.append(f"{source.describe(key_path)}: {error.error_message}, got {table[key]!r}")
        return {}


def _explain_unknown_key(key: str, level: str, path: list) -> str:
    where = format_key_path(path)
    if key in UNSUPPORTED_SD_SCRIPTS_OPTIONS:
        return f"{where}: the sd-scripts option `{key}` is not supported: {UNSUPPORTED_SD_SCRIPTS_OPTIONS[key]}; remove it"
    if key in COMMAND_LINE_NAMES:
        return f"{where}: `{key}` is the command-line flag; in a dataset config write {COMMAND_LINE_NAMES[key]}"
    homes = [name for name, options in LEVEL_OPTIONS.items() if key in options and name != level]
    if homes:
        headers = {"general": "[general]", "dataset": "[[datasets]]", "subset": "[[datasets.subsets]]"}
        places = " or ".join(headers[name] for name in homes)
        here = "is outside any section" if level == "top" else "cannot be set here"
        return f"{where}: `{key}` {here}; it belongs in {places}"
    if level == "top":
        hint = did_you_mean(key, TOP_LEVEL_SECTIONS)
        return f"unknown section `{key}`: the file holds [general] and [[datasets]]{hint}"
    return f"{where}: unknown option `{key}`{did_you_mean(key, LEVEL_OPTIONS[level])}"


# --- building the specs with cascading defaults ---

def _build_group(document: dict, source: _Source) -> DatasetGroupSpec:
    if not document["datasets"]:
        raise source.error([], "no [[datasets]]: add a [[datasets]] table with at least one [[datasets.subsets]]")
    datasets = [_build_dataset(document["general"], dataset, ["datasets", index], source)
                for index, dataset in enumerate(document["datasets"])]
    tables = [document["general"], *document["datasets"], *(s for d in document["datasets"] for s in d["subsets"])]
    for key, message in WITHOUT_EFFECT_OPTIONS.items():
        if any(table.get(key) for table in tables):
            logger.info("%s: %s", source.name, message)
    return DatasetGroupSpec(datasets=datasets, source=source.name)


def _build_dataset(general: dict, dataset: dict, path: list, source: _Source) -> DatasetSpec:
    subset_tables = dataset["subsets"]
    if not subset_tables:
        raise source.error(path, "no [[datasets.subsets]]: add one with image_dir (or metadata_file)")
    kinds = {"metadata_file" in subset for subset in subset_tables}
    if len(kinds) > 1:
        raise source.error(path, "DreamBooth subsets (image_dir only) and fine-tuning subsets (metadata_file) "
                                 "cannot share a dataset: split them into two [[datasets]]")
    fine_tuning = kinds == {True}
    if fine_tuning:
        _reject_dreambooth_options(dataset, path, source)
        general = {key: value for key, value in general.items() if key not in DREAMBOOTH_ONLY_OPTIONS}
    options = _cascade(DATASET_OPTIONS, general, dataset)
    spec = DatasetSpec(subsets=[], is_validation=dataset.get("is_validation", False), **options)
    _check_bucket_options(spec, path, source)
    for index, subset in enumerate(subset_tables):
        subset_path = path + ["subsets", index]
        if fine_tuning:
            _reject_dreambooth_options(subset, subset_path, source)
        built = _build_subset(_cascade(SUBSET_OPTIONS, general, dataset, subset), subset, subset_path, source)
        if _is_duplicate(built, spec.subsets, subset_path, source):
            continue
        spec.subsets.append(built)
    return spec


def _cascade(options: dict, *layers: dict) -> dict:
    """Later layers win: general, then dataset, then subset."""
    merged: dict = {}
    for layer in layers:
        merged.update({key: value for key, value in layer.items() if key in options})
    return merged


def _reject_dreambooth_options(table: dict, path: list, source: _Source) -> None:
    for key in DREAMBOOTH_ONLY_OPTIONS:
        if key in table:
            reason = ("cannot be regularisation images" if key == "is_reg"
                      else "take their captions from the metadata file, so this option has no effect")
            raise source.error(path + [key], f"fine-tuning subsets (metadata_file) {reason}: remove it")


def _build_subset(options: dict, table: dict, path: list, source: _Source) -> SubsetSpec:
    if "image_dir" not in table and "metadata_file" not in table:
        raise source.error(path, "a subset needs image_dir (a folder of images) or metadata_file (fine-tuning)")
    folders = {key: _existing_path(table, key, path, source)
               for key in ("image_dir", "metadata_file", "conditioning_data_dir")}
    for key in WITHOUT_EFFECT_OPTIONS:
        options.pop(key, None)
    captions = CaptionOptions(**{key: value for key, value in options.items() if key in _CAPTION_FIELDS})
    others = {key: value for key, value in options.items() if key not in _CAPTION_FIELDS}
    return SubsetSpec(**folders, is_reg=table.get("is_reg", False), captions=captions, **others)


def _existing_path(table: dict, key: str, path: list, source: _Source) -> str | None:
    if key not in table:
        return None
    location = os.path.expanduser(table[key])
    is_folder = key != "metadata_file"
    found = os.path.isdir(location) if is_folder else os.path.isfile(location)
    if not found:
        kind = "folder" if is_folder else "file"
        relative = "" if os.path.isabs(location) else f" (relative to the current folder {os.getcwd()})"
        raise source.error(path + [key], f"{kind} not found: {location}{relative}")
    return location


def _is_duplicate(subset: SubsetSpec, earlier: list[SubsetSpec], path: list, source: _Source) -> bool:
    """sd-scripts uses a folder (or metadata file) once per dataset and ignores repeats of it; so do we, loudly."""
    def identity(item: SubsetSpec) -> str:
        return os.path.realpath(item.metadata_file or item.image_dir)

    if any(identity(subset) == identity(other) for other in earlier):
        logger.warning("%s: %s repeats an earlier subset of the same dataset (%s) and is ignored, as in sd-scripts",
                       source.name, source.describe(path), subset.metadata_file or subset.image_dir)
        return True
    return False


def _check_bucket_options(spec: DatasetSpec, path: list, source: _Source) -> None:
    """The range against the resolution is checked by library/data/buckets.py, after rounding to the steps."""
    name = source.option_name
    if spec.min_bucket_reso > spec.max_bucket_reso:
        raise source.error(path, f"{name('min_bucket_reso')} ({spec.min_bucket_reso}) is larger than "
                                 f"{name('max_bucket_reso')} ({spec.max_bucket_reso})")


# --- the --train_data_dir folder convention ---

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$", re.DOTALL)


def _load_from_folders(args: argparse.Namespace) -> DatasetGroupSpec:
    passed = set(passed_dataset_flags(args))
    if "in_json" in passed:
        subsets = [_metadata_subset(args, passed)]
    elif "train_data_dir" in passed:
        subsets = _folder_subsets(args.train_data_dir, "--train_data_dir", is_reg=False)
        if "reg_data_dir" in passed:
            subsets += _folder_subsets(args.reg_data_dir, "--reg_data_dir", is_reg=True)
    else:
        raise UserError("no training images given: pass --dataset_config FILE (.toml or .json) or "
                        "--train_data_dir FOLDER (with subfolders named like `10_sks dog`, 10 = repeats; "
                        "or with --in_json METADATA.json, images directly in it)")
    if "conditioning_data_dir" in passed:
        for subset in subsets:
            subset["conditioning_data_dir"] = args.conditioning_data_dir
    general = _passed_option_flags(args)
    source = _Source("<command line>", _describe_cli_path, lambda key: f"--{flag_for_config_key(key)}")
    document = _validate_document({"general": general, "datasets": [{"subsets": subsets}]}, source)
    return _build_group(document, source)


def _metadata_subset(args: argparse.Namespace, passed: set[str]) -> dict:
    """sd-scripts' fine-tuning workflow: --in_json names the images (in --train_data_dir) and their captions."""
    if "reg_data_dir" in passed:
        raise UserError("--reg_data_dir with --in_json: fine-tuning (metadata) datasets have no regularisation "
                        "images; remove --reg_data_dir, or use a --dataset_config with a DreamBooth dataset for them")
    subset = {"metadata_file": args.in_json}
    if "train_data_dir" in passed:
        if not Path(args.train_data_dir).expanduser().is_dir():
            raise UserError(f"--train_data_dir {args.train_data_dir}: folder not found")
        subset["image_dir"] = args.train_data_dir
    return subset


def _folder_subsets(folder: str, flag: str, is_reg: bool) -> list[dict]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {folder}: folder not found")
    subsets = []
    for child in sorted(path for path in root.iterdir() if path.is_dir()):
        match = _REPEATS_FOLDER.match(child.name)
        if match is None or int(match.group(1)) < 1:
            logger.warning("%s: skipping folder %s: its name does not start with `N_` "
                           "(N >= 1 repeats, e.g. `10_sks dog`)", flag, child)
            continue
        subsets.append({"image_dir": str(child), "num_repeats": int(match.group(1)),
                        "class_tokens": match.group(2), "is_reg": is_reg})
    if not subsets:
        raise UserError(f"{flag} {folder}: no subfolder named `N_class tokens` (e.g. `10_sks dog`, N = repeats); "
                        f"put the images in such subfolders")
    return subsets
