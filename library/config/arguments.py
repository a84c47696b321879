"""Builds the command line of a training script from each module's argument group.

Flag names and meanings follow sd-scripts so users' commands and `--config_file` files carry over.
This module owns the general training flags (output, saving, steps, precision, logging, resume) and
composes them with the groups owned elsewhere: dataset (config/dataset_args.py), caching
(data/dataset.py), noise and loss (training/noise.py), optimizer and LR schedule, sample images
(training/sampling.py), validation loss (training/validation.py), EMA (training/ema.py), the family's own
flags, and either the network flags (networks/network_arguments.py) or the full fine-tune flags.
"""

from __future__ import annotations

import argparse

from library.errors import UserError
from library.models.saved_formats import SAVE_MODEL_FORMATS

TRAINING_MODES = ("network", "full")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and saving")
    group.add_argument("--output_dir", required=True, help="folder for the trained files")
    group.add_argument("--output_name", default="last", help="base name of the trained files")
    group.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                       help="dtype of saved weights (default: float32)")
    group.add_argument("--save_every_n_steps", type=int, default=None)
    group.add_argument("--save_every_n_epochs", type=int, default=None)
    group.add_argument("--save_last_n_steps", type=int, default=None,
                       help="keep only the step saves of the last N steps")
    group.add_argument("--save_last_n_epochs", type=int, default=None,
                       help="keep only the last N epoch saves")
    group.add_argument("--save_state", action="store_true",
                       help="also save a resumable state folder with every save and at the end")
    group.add_argument("--save_last_n_steps_state", type=int, metavar="N", default=None,
                       help="keep only the state folders of the last N steps (default: as --save_last_n_steps)")
    group.add_argument("--save_last_n_epochs_state", type=int, metavar="N", default=None,
                       help="keep only the last N epoch state folders (default: as --save_last_n_epochs)")
    group.add_argument("--save_state_on_train_end", action="store_true",
                       help="save a resumable state folder at the end only")
    group.add_argument("--resume", default=None,
                       help="state folder to resume from, or `latest` for the newest in --output_dir")


def add_training_loop_arguments(parser: argparse.ArgumentParser) -> None:
    from library.cli import add_console_log_arguments
    from library.training.initial_step import add_initial_step_arguments
    from library.training.trackers import add_tracker_arguments
    from library.training.fused_backward import add_offload_checkpointing_argument

    group = parser.add_argument_group("training loop")
    group.add_argument("--max_train_steps", type=int, default=1600)
    group.add_argument("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    add_initial_step_arguments(group)
    group.add_argument("--max_nonfinite_steps", type=int, metavar="N", default=3,
                       help="stop after this many steps in a row with a NaN/inf loss (each is skipped; default 3)")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    group.add_argument("--full_fp16", action="store_true", help="train fp16 weights (no fp32 master copy)")
    group.add_argument("--full_bf16", action="store_true", help="train bf16 weights (no fp32 master copy)")
    group.add_argument("--gradient_checkpointing", action="store_true")
    add_offload_checkpointing_argument(group)
    group.add_argument("--logging_dir", default=None, help="TensorBoard log folder (enables logging)")
    add_tracker_arguments(group)
    add_console_log_arguments(group)
    group.add_argument("--log_prefix", default=None, help="prefix of the run folder under --logging_dir")
    group.add_argument("--loss_log_every", type=int, default=None,
                       help="log the mean loss every N steps (default: ten lines per run)")
    group.add_argument("--config_file", default=None, help="TOML file holding any of these arguments")


def add_full_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from library.training.fused_backward import add_fused_backward_arguments

    group = parser.add_argument_group("full fine-tuning")
    group.add_argument("--train_text_encoder", action="store_true", help="also train the text encoder(s)")
    group.add_argument("--learning_rate_te", type=float, default=None,
                       help="learning rate of the text encoder (default: --learning_rate)")
    group.add_argument("--save_model_as", choices=SAVE_MODEL_FORMATS, default="safetensors",
                       help="safetensors (one file), ckpt (sd-scripts' torch file, same tensors), diffusers or "
                            "diffusers_safetensors (a diffusers folder, safetensors weights either way)")
    add_fused_backward_arguments(group)


def validate_general_args(args: argparse.Namespace) -> None:
    from library.training.initial_step import validate_initial_step_args
    from library.training.trackers import validate_tracker_args

    validate_initial_step_args(args)
    positive = ["max_train_steps", "max_train_epochs", "gradient_accumulation_steps", "save_every_n_steps",
                "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs", "loss_log_every",
                "save_last_n_steps_state", "save_last_n_epochs_state", "max_nonfinite_steps"]
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    if args.full_fp16 and args.mixed_precision != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision bf16")
    validate_tracker_args(args)
    if args.save_last_n_steps and not args.save_every_n_steps:
        raise UserError("--save_last_n_steps needs --save_every_n_steps")
    if args.save_last_n_epochs and not args.save_every_n_epochs:
        raise UserError("--save_last_n_epochs needs --save_every_n_epochs")
    for unit in ("steps", "epochs"):
        if getattr(args, f"save_last_n_{unit}_state") and not (args.save_state and getattr(args, f"save_every_n_{unit}")):
            raise UserError(f"--save_last_n_{unit}_state needs --save_state and --save_every_n_{unit}")
    if args.log_prefix and not args.logging_dir:
        raise UserError("--log_prefix needs --logging_dir (the folder the logs go to)")
    if getattr(args, "learning_rate_te", None) is not None and not getattr(args, "train_text_encoder", False):
        raise UserError("--learning_rate_te has no effect without --train_text_encoder")
    validate_caching_flags(args)


def validate_caching_flags(args: argparse.Namespace) -> None:
    """Latent-cache options only act when latents are cached."""
    to_disk_only = [flag for flag in ("latents_cache_dir", "skip_cache_check") if getattr(args, flag, None)]
    if to_disk_only and not args.cache_latents_to_disk:
        raise UserError(f"--{to_disk_only[0]} needs --cache_latents_to_disk")
    if args.vae_batch_size != 1 and not (args.cache_latents or args.cache_latents_to_disk):
        raise UserError("--vae_batch_size needs --cache_latents or --cache_latents_to_disk")


def build_parser(family, mode: str) -> argparse.ArgumentParser:
    from library.config.dataset_args import add_dataset_arguments
    from library.config.sd_scripts_compat import add_compat_arguments
    from library.training.attention import add_attention_arguments
    from library.config.weight_storage_args import add_weight_storage_arguments
    from library.data.dataset import add_caching_arguments, add_data_loading_arguments
    from library.data.text_encoder_cache import add_text_encoder_cache_arguments
    from library.training.lr_schedulers import add_lr_scheduler_arguments
    from library.training.ema import add_ema_arguments
    from library.training.optimizers import add_optimizer_arguments
    from library.training.sampling import add_sampling_arguments
    from library.training.validation import add_validation_arguments

    what = "a LoRA" if mode == "network" else "a full fine-tune"
    parser = argparse.ArgumentParser(description=f"Train {what} of a {family.display_name} model.")
    add_output_arguments(parser)
    add_training_loop_arguments(parser)
    family.add_arguments(parser)
    add_dataset_arguments(parser)
    add_caching_arguments(parser)
    add_data_loading_arguments(parser)
    add_text_encoder_cache_arguments(parser)
    add_weight_storage_arguments(parser)
    family.add_noise_arguments(parser)
    add_optimizer_arguments(parser)
    add_lr_scheduler_arguments(parser)
    add_sampling_arguments(parser)
    add_validation_arguments(parser)
    add_ema_arguments(parser)
    add_attention_arguments(parser)
    if mode == "network":
        from networks.network_arguments import add_network_arguments

        add_network_arguments(parser)
    else:
        add_full_finetune_arguments(parser)
    add_compat_arguments(parser, family.name, mode)
    return parser


def parse_training_args(family, mode: str, argv: list[str] | None = None):
    """Parse and validate a training run's flags; returns (the family configured with its validated
    settings for this mode, the arguments)."""
    from library.config.config_file import parse_args_with_config_file
    from library.cli import apply_console_log_args
    from library.config.sd_scripts_compat import log_accepted_flags
    from library.training.optimizers import apply_optimizer_switches
    from library.data.text_encoder_cache import validate_text_cache_args
    from library.training.ema import validate_ema_args
    from library.training.fused_backward import validate_memory_args
    from library.training.modes import MODE_KINDS
    from library.training.sampling import validate_sampling_args
    from library.training.validation import validate_validation_args

    if mode not in TRAINING_MODES:
        raise ValueError(f"unknown training mode {mode!r}")
    kind = MODE_KINDS[mode]
    args = parse_args_with_config_file(build_parser(family, mode), argv)
    apply_console_log_args(args)
    log_accepted_flags(args, family.name, mode)
    apply_optimizer_switches(args)
    if mode == "network":
        from networks.network_arguments import resolve_numbered_text_encoder_lrs

        resolve_numbered_text_encoder_lrs(args)
    validate_general_args(args)
    validate_sampling_args(args)
    validate_validation_args(args)
    validate_ema_args(args)
    validate_text_cache_args(args, kind, family.text_cache_trains_denoiser_only)
    validate_memory_args(args, family.has_block_lists)
    return family.configure(args, kind), args
