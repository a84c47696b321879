"""sd-scripts' --initial_step / --initial_epoch / --skip_until_initial_step: start a run part-way.

`--initial_step N` (or `--initial_epoch E`, meaning N = (E - 1) * optimizer steps per epoch) starts the
run where a run with the same seed would stand after N optimizer steps: the step counter, the epoch
number and the next batch of that epoch. Training stops at --max_train_steps as usual, so
max_train_steps - N steps are trained; saves, samples and logs carry the shifted step numbers. As in
sd-scripts, the learning-rate schedule is not advanced (it starts from its beginning) unless --resume
restores it, and --initial_step overrides the step of a resumed state. Our batch order is a function
of the seed and the epoch, so the batches of the skipped steps are left out without being loaded:
that is what sd-scripts' --skip_until_initial_step asks for, and here it is also what happens without
it (sd-scripts would then restart the data at the beginning of that epoch).
"""

from __future__ import annotations

import argparse
import logging

from library.errors import UserError
from library.training.state import TrainingPosition

logger = logging.getLogger(__name__)


def add_initial_step_arguments(group) -> None:
    group.add_argument("--initial_step", type=int, default=None, metavar="N",
                       help="start as if N optimizer steps were done (step counter, epoch, data position); the LR "
                            "schedule still starts at its beginning unless --resume")
    group.add_argument("--initial_epoch", type=int, default=None, metavar="E",
                       help="start at the first step of epoch E (1 = the normal start); --initial_step wins")
    group.add_argument("--skip_until_initial_step", action="store_true",
                       help="skip the data of the steps before --initial_step (always done here; accepted for "
                            "sd-scripts compatibility)")


def validate_initial_step_args(args: argparse.Namespace) -> None:
    if args.initial_step is not None and args.initial_step < 0:
        raise UserError(f"--initial_step must not be negative (got {args.initial_step})")
    if args.initial_epoch is not None and args.initial_epoch < 1:
        raise UserError(f"--initial_epoch counts from 1 (got {args.initial_epoch})")
    if args.skip_until_initial_step and args.initial_step is None and args.initial_epoch is None:
        raise UserError("--skip_until_initial_step needs --initial_step or --initial_epoch")


def requested_initial_step(args: argparse.Namespace, steps_per_epoch: int) -> int | None:
    if args.initial_step is not None:
        return args.initial_step
    if args.initial_epoch is not None:
        return (args.initial_epoch - 1) * steps_per_epoch
    return None


def initial_position(args: argparse.Namespace, position: TrainingPosition, steps_per_epoch: int,
                     num_batches: int, max_steps: int) -> TrainingPosition:
    """`position` (the start, or the resumed state's) moved to the requested initial step, if any."""
    step = requested_initial_step(args, steps_per_epoch)
    if step is None:
        return position
    if step >= max_steps:
        raise UserError(f"--initial_step {step} leaves nothing to train: --max_train_steps ({max_steps}) must be "
                        "greater")
    if args.resume:
        logger.warning("--initial_step %d replaces the step of the resumed state (%d)", step, position.global_step)
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    batch_index = min(step_in_epoch * args.gradient_accumulation_steps, num_batches)
    logger.info("starting at step %d (epoch %d, batch %d of %d); %d steps to train, learning-rate schedule from its "
                "start%s", step, epoch + 1, batch_index, num_batches, max_steps - step,
                "" if not args.resume else " as restored by --resume")
    return TrainingPosition(global_step=step, epoch=epoch + 1, batch_index=batch_index, seed=position.seed)
