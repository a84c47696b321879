"""Experiment trackers of a training run: `--log_with tensorboard|wandb|all`, as in sd-scripts.

TensorBoard writes under `--logging_dir`; wandb goes through accelerate's tracker when the `wandb`
package is installed (it is not a dependency: `pip install wandb`, then `wandb login` once).
`--log_tracker_name` names the project (default: `--log_prefix`, else "train"), `--wandb_run_name`
the wandb run, and `--log_config` sends the run's flags as the tracker config, without secrets and
without paths that may hold personal names (sd-scripts' rule).
"""

from __future__ import annotations

import argparse
import importlib.util

from library.errors import UserError

TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
_SECRETS = ("wandb_api_key", "huggingface_token")
_PATHS = ("pretrained_model_name_or_path", "vae", "ae", "clip_l", "clip_g", "t5xxl", "gemma2", "train_data_dir",
          "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir", "dataset_config", "config_file",
          "in_json", "network_weights", "resume", "sample_prompts")


def add_tracker_arguments(group) -> None:
    group.add_argument("--log_with", choices=sorted(TRACKERS), default=None,
                       help="tensorboard (default when --logging_dir is set), wandb, or all (both)")
    group.add_argument("--log_tracker_name", default=None, help="tracker project name (default: --log_prefix or train)")
    group.add_argument("--wandb_run_name", default=None, help="name of the wandb run")
    group.add_argument("--log_config", action="store_true",
                       help="send the run's flags to the trackers (secrets and paths left out)")


def tracker_names(args: argparse.Namespace) -> list[str]:
    """The accelerate trackers to start; a missing wandb package or logging folder is a UserError."""
    names = TRACKERS[args.log_with] if args.log_with else (["tensorboard"] if args.logging_dir else [])
    if "tensorboard" in names and not args.logging_dir:
        raise UserError(f"--log_with {args.log_with} needs --logging_dir (the folder TensorBoard writes to)")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--log_with {args.log_with}: the wandb package is not installed; `pip install wandb` "
                        "and `wandb login`, or use --log_with tensorboard")
    return names


def validate_tracker_args(args: argparse.Namespace) -> None:
    tracker_names(args)
    given = [flag for flag in ("log_tracker_name", "wandb_run_name") if getattr(args, flag)]
    if (given or args.log_config) and not (args.log_with or args.logging_dir):
        raise UserError(f"--{(given or ['log_config'])[0]} needs a tracker: --logging_dir and/or --log_with")
    if args.wandb_run_name and "wandb" not in TRACKERS.get(args.log_with or "", []):
        raise UserError("--wandb_run_name needs --log_with wandb or all")


def loggable_config(args: argparse.Namespace) -> dict:
    """The flags as tracker config: scalars as they are, other values as text; no secrets, no paths."""
    config = {}
    for key, value in vars(args).items():
        if key in _SECRETS or key in _PATHS:
            continue
        config[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return config


def start_trackers(accelerator, args: argparse.Namespace) -> None:
    project = args.log_tracker_name or args.log_prefix or "train"
    init_kwargs = {"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {}
    accelerator.init_trackers(project, config=loggable_config(args) if args.log_config else None,
                              init_kwargs=init_kwargs)
