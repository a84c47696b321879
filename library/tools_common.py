"""What the stand-alone tools (tools/*.py) share: choosing the family, their flags, sharding, errors.

Tools take `--family sd|sdxl|flux|sd3|lumina` (also sd-scripts' `--sdxl` / `--flux` switches; the
default is sd, like sd-scripts' tools) and, where they read a model or a dataset, exactly the
training scripts' model, dataset and caching flags, built from the same argument groups, so a
training command's flags (or its `--config_file`) carry over. Under `accelerate launch`, each
process takes every world-size-th image (`shard_entries`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional

from library.errors import USER_ERROR_EXIT_CODE, UserError
from library.families.table import FAMILIES, FAMILY_NAMES

logger = logging.getLogger(__name__)

FAMILY_SWITCHES = {facts.tool_switch: name for name, facts in FAMILIES.items() if facts.tool_switch}  # --sdxl, --flux


def add_family_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model family")
    group.add_argument("--family", choices=FAMILY_NAMES, default=None,
                       help="model family of the files (default: sd = Stable Diffusion 1.x/2.x)")
    for switch, family in FAMILY_SWITCHES.items():
        group.add_argument(f"--{switch}", action="store_true", help=f"same as --family {family} (sd-scripts' spelling)")


def family_from_flags(values: dict) -> Optional[str]:
    chosen = {values["family"]} if values.get("family") else set()
    chosen |= {family for switch, family in FAMILY_SWITCHES.items() if values.get(switch)}
    if len(chosen) > 1:
        raise UserError(f"conflicting family flags ({', '.join(sorted(chosen))}): give only one of "
                        "--family, --sdxl, --flux")
    return chosen.pop() if chosen else None


def _family_in_config_file(path: str) -> Optional[str]:
    from library.config.config_file import load_toml

    values = {}
    for key, value in load_toml(path).items():
        values.update(value if isinstance(value, dict) else {key: value})  # sections only group keys
    return family_from_flags(values)


def choose_family_name(argv: list[str]) -> str:
    """The family the command line (or its --config_file) asks for; "sd" when none."""
    peek = argparse.ArgumentParser(add_help=False)
    add_family_arguments(peek)
    peek.add_argument("--config_file", default=None)
    known, _ = peek.parse_known_args(argv)
    name = family_from_flags(vars(known))
    if name is None and known.config_file:
        name = _family_in_config_file(known.config_file)
    return name or "sd"


def build_model_data_parser(family, description: str, model_optional: bool = False) -> argparse.ArgumentParser:
    """--family plus the family's model flags and the training scripts' dataset and caching flags.

    With model_optional, the family's required flags become optional (a tool that needs only the
    VAE gets it from --vae, --ae, ...; the family's load_vae says what is missing).
    """
    from library.config.dataset_args import add_dataset_arguments
    from library.data.dataset import add_caching_arguments, add_data_loading_arguments

    parser = argparse.ArgumentParser(description=description)
    add_family_arguments(parser)
    family.add_arguments(parser)
    if model_optional:
        for action in parser._actions:  # argparse has no public way to relax a flag
            action.required = False
    add_dataset_arguments(parser)
    add_caching_arguments(parser)
    add_data_loading_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset order (does not change caches)")
    parser.add_argument("--config_file", default=None, help="TOML file holding any of these arguments")
    return parser


def _training_defaults(family) -> dict:
    """Every flag of the family's LoRA training parser at its default."""
    from library.config.arguments import build_parser

    return {action.dest: action.default for action in build_parser(family, "network")._actions
            if action.dest != argparse.SUPPRESS and action.dest != "help" and action.default != argparse.SUPPRESS}


def parse_tool_args(family, parser: argparse.ArgumentParser, argv: list[str]):
    """Parse the tool's flags; training-only flags the family reads (noise schedule, network options)
    are present at their LoRA-training defaults, so the family validates and loads as for training.
    Returns (the family configured for LoRA training, the arguments)."""
    from library.config.config_file import parse_args_with_config_file
    from library.training.modes import NETWORK

    parsed = parse_args_with_config_file(parser, argv)
    args = argparse.Namespace(**{**_training_defaults(family), **vars(parsed)})
    return family.configure(args, NETWORK), args


def load_dataset(args: argparse.Namespace):
    from library.config.dataset_config import load_dataset_group
    from library.data.dataset import TrainDataset

    return TrainDataset.from_spec(load_dataset_group(args), seed=args.seed, prior_loss_weight=args.prior_loss_weight)


def shard_entries(entries: list, rank: int, world_size: int) -> list:
    """The entries process `rank` of `world_size` caches: every world_size-th image file, so all
    entries of one image (it may sit in several datasets) land in the same process."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    images = sorted({os.path.abspath(entry.image_path) for entry in entries})
    mine = set(images[rank::world_size])
    return [entry for entry in entries if os.path.abspath(entry.image_path) in mine]


class DatasetShard:
    """A dataset seen through a subset of its entries (one process's share of a caching job).

    Images found unreadable are only reported here; training decides what to do with them.
    """

    def __init__(self, dataset, entries: list) -> None:
        self._dataset = dataset
        self.entries = entries
        self.dropped: list = []

    def __getattr__(self, name: str):
        return getattr(self._dataset, name)

    def drop_entries(self, dropped: list) -> None:
        self.dropped.extend(dropped)
        ids = {id(entry) for entry in dropped}
        self.entries = [entry for entry in self.entries if id(entry) not in ids]


def run_tool(main: Callable[[list[str]], None], argv: Optional[list[str]] = None) -> None:
    """Run a tool's main(argv): a UserError is one line on stderr and exit code 2."""
    from library.cli import setup_logging

    setup_logging()
    try:
        main(sys.argv[1:] if argv is None else list(argv))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
