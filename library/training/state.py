"""Resumable training state folders: write them atomically, find the newest, load them back.

A state folder holds what accelerate's `save_state` writes (trainable weights, optimizer, LR
scheduler, RNG states) plus `train_state.json` with the position in training (global step, epoch,
next batch index, seed). The folder is first written under a temporary name and only renamed into
place once complete, so a kill during a save never leaves a corrupt newest state; a folder without
`train_state.json` is half-written and `--resume latest` skips it with a warning.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
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


def save_training_state(accelerator, folder: str, position: TrainingPosition) -> None:
    partial = f"{folder}.partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.save_state(partial)
    record = {"format_version": STATE_FORMAT_VERSION, **asdict(position)}
    write_text_atomic(os.path.join(partial, STATE_FILE), json.dumps(record, indent=2))
    previous = f"{folder}.previous"
    if os.path.exists(folder):
        os.replace(folder, previous)
    os.replace(partial, folder)
    if os.path.exists(previous):
        shutil.rmtree(previous)
    logger.info("saved training state to %s", folder)


def read_position(folder: str) -> TrainingPosition | None:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return TrainingPosition(**{k: record[k] for k in ("global_step", "epoch", "batch_index", "seed")})


def find_latest_state(output_dir: str, output_name: str) -> str | None:
    """The complete state folder of `output_name` with the highest global step, or None."""
    best, best_step = None, -1
    for folder in glob.glob(os.path.join(glob.escape(output_dir), f"{glob.escape(output_name)}*-state")):
        position = read_position(folder)
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
