"""Resumable training state folders: write them atomically, find the newest, load them back.

A state folder holds what accelerate's `save_state` writes (trainable weights, optimizer, LR
scheduler, RNG states of every process) plus `train_state.json` with the position in training
(global step, epoch, next batch index, seed). It is written as `<folder>.partial`, `train_state.json`
last, and only then renamed into place (the folder it replaces is kept as `<folder>.previous`
until the rename is done), so a kill at any moment leaves the newest complete state findable:
`--resume latest` takes the complete folder with the highest step and skips half-written ones
with a warning. The position is all the trainer needs besides accelerate's files, because every
random draw is keyed by position (library/training/step_rng.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass

from library.atomic_io import write_text_atomic
from library.errors import UserError

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
STATE_FORMAT_VERSION = 1


@dataclass
class TrainingPosition:
    global_step: int
    epoch: int  # 1-based epoch the next batch belongs to
    batch_index: int  # index of the next batch to run inside that epoch
    seed: int


STATE_FOLDER_SUFFIXES = ("", ".partial", ".previous")  # the folder, a save in progress, the one it replaces
PAUSE_FOR_TESTS_ENV = "DIFFUSION_TRAINER_TEST_PAUSE_IN_STATE_SAVE"  # seconds; lets tests kill mid-save


def save_training_state(accelerator, folder: str, position: TrainingPosition) -> None:
    """Write the state to `<folder>.partial`, then rename it into place (called on every process)."""
    partial, previous = f"{folder}.partial", f"{folder}.previous"
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial)  # each process writes its own RNG file into the folder
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _pause_for_tests()
            record = {"format_version": STATE_FORMAT_VERSION, **asdict(position)}
            write_text_atomic(os.path.join(partial, STATE_FILE), json.dumps(record, indent=2))
    except KeyboardInterrupt:  # a second Ctrl+C (library/training/stop_signal.py): leave no half-written folder
        if not os.path.exists(os.path.join(partial, STATE_FILE)):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if os.path.exists(previous) and os.path.exists(folder):
            shutil.rmtree(previous)  # left by a save killed after its rename
        if os.path.exists(folder):
            os.replace(folder, previous)
        os.replace(partial, folder)
        if os.path.exists(previous):
            shutil.rmtree(previous)
        logger.info("saved training state to %s", folder)
    accelerator.wait_for_everyone()


def _pause_for_tests() -> None:
    seconds = os.environ.get(PAUSE_FOR_TESTS_ENV)
    if seconds:
        logger.warning("%s=%s: pausing inside the state save", PAUSE_FOR_TESTS_ENV, seconds)
        time.sleep(float(seconds))


def read_position(folder: str) -> TrainingPosition | None:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    keys = ("global_step", "epoch", "batch_index", "seed")
    if not isinstance(record, dict) or any(key not in record for key in keys):
        raise UserError(f"{folder} was written by another trainer (e.g. sd-scripts) and cannot be resumed here; "
                        "start a new run from its LoRA with --network_weights")
    return TrainingPosition(**{key: record[key] for key in keys})


def find_latest_state(output_dir: str, output_name: str) -> str | None:
    """The complete state folder of `output_name` with the highest global step, or None.

    A folder is complete once it has train_state.json (written last); that includes a `.partial`
    or `.previous` folder left by a kill during the final renames. Others are ignored with a warning.
    """
    pattern = re.compile(rf"{re.escape(output_name)}(-step\d+|-\d+)?-state(\.partial|\.previous)?")
    best, best_step = None, -1
    for name in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []:
        folder = os.path.join(output_dir, name)
        if not pattern.fullmatch(name) or not os.path.isdir(folder):
            continue
        try:
            position = read_position(folder)
        except (UserError, ValueError) as error:
            logger.warning("ignoring %s: %s", folder, error)
            continue
        if position is None:
            logger.warning("ignoring %s: it has no %s (a save was interrupted)", folder, STATE_FILE)
            continue
        if position.global_step > best_step:
            best, best_step = folder, position.global_step
    return best


def resolve_resume_folder(resume: str, output_dir: str, output_name: str) -> str | None:
    if resume == "latest":
        folder = find_latest_state(output_dir, output_name)
        if folder is None:
            logger.warning("--resume latest: no complete state of %s in %s; starting fresh", output_name, output_dir)
        return folder
    if not os.path.isdir(resume):
        raise UserError(f"--resume {resume}: no such state folder")
    if read_position(resume) is None:
        raise UserError(f"--resume {resume}: {STATE_FILE} is missing, so the folder is incomplete; pick another state")
    return resume


def load_training_state(accelerator, folder: str) -> TrainingPosition:
    position = read_position(folder)
    accelerator.load_state(folder)
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, position.global_step,
                position.epoch, position.batch_index)
    return position
