"""Names, schedule and pruning of the files a training run writes.

File names follow sd-scripts so users' scripts keep working: `<name>-step00000200.safetensors` for
step saves, `<name>-000003.safetensors` for epoch saves, `<name>.safetensors` at the end, and the
same stems with `-state` for resumable state folders. Old saves are pruned as sd-scripts does, model
files by --save_last_n_steps/epochs and state folders by --save_last_n_steps/epochs_state.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

from library.training.state import STATE_FOLDER_SUFFIXES

logger = logging.getLogger(__name__)


def step_stem(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"


def epoch_stem(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


def state_dir_name(stem: str) -> str:
    return f"{stem}-state"


@dataclass
class SaveSchedule:
    """When to save, from --save_every_n_steps/epochs and --save_last_n_steps/epochs(_state).

    State folders are pruned by --save_last_n_steps_state/--save_last_n_epochs_state, which default
    to the file windows, as in sd-scripts.
    """

    every_n_steps: int | None
    every_n_epochs: int | None
    last_n_steps: int | None
    last_n_epochs: int | None
    last_n_steps_state: int | None = None
    last_n_epochs_state: int | None = None

    @classmethod
    def from_args(cls, args) -> "SaveSchedule":
        return cls(args.save_every_n_steps, args.save_every_n_epochs, args.save_last_n_steps, args.save_last_n_epochs,
                   args.save_last_n_steps_state, args.save_last_n_epochs_state)

    def saves_at_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def saves_at_epoch(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0

    def step_to_prune(self, step: int, state: bool = False) -> int | None:
        """The step save (file, or state folder) that falls out of its window when `step` is saved."""
        last_n = (self.last_n_steps_state or self.last_n_steps) if state else self.last_n_steps
        if not last_n:
            return None
        old = step - self.every_n_steps * (last_n // self.every_n_steps + 1)
        return old if old > 0 else None

    def epoch_to_prune(self, epoch: int, state: bool = False) -> int | None:
        last_n = (self.last_n_epochs_state or self.last_n_epochs) if state else self.last_n_epochs
        if not last_n:
            return None
        old = epoch - self.every_n_epochs * last_n
        return old if old > 0 else None


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
        logger.info("removed old save %s", path)
    elif os.path.isfile(path):
        os.remove(path)
        logger.info("removed old save %s", path)


def remove_saved_file(output_dir: str, stem: str, extension: str) -> None:
    """Remove a pruned save (a file, or a diffusers folder when extension is "")."""
    _remove(os.path.join(output_dir, stem + extension))


def remove_saved_state(output_dir: str, stem: str) -> None:
    """Remove a pruned state folder and any interrupted save of it."""
    for suffix in STATE_FOLDER_SUFFIXES:
        _remove(os.path.join(output_dir, state_dir_name(stem) + suffix))
