"""Names, schedule and pruning of the files a training run writes.

File names follow sd-scripts so users' scripts keep working: `<name>-step00000200.safetensors` for
step saves, `<name>-000003.safetensors` for epoch saves, `<name>.safetensors` at the end, and the
same stems with `-state` for resumable state folders.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def step_stem(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"


def epoch_stem(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


def state_dir_name(stem: str) -> str:
    return f"{stem}-state"


@dataclass
class SaveSchedule:
    """When to save, from --save_every_n_steps/epochs and --save_last_n_steps/epochs."""

    every_n_steps: int | None
    every_n_epochs: int | None
    last_n_steps: int | None
    last_n_epochs: int | None

    def saves_at_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def saves_at_epoch(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0

    def step_to_prune(self, step: int) -> int | None:
        """The step save that falls out of the --save_last_n_steps window when `step` is saved."""
        if not self.last_n_steps:
            return None
        old = step - self.every_n_steps * (self.last_n_steps // self.every_n_steps + 1)
        return old if old > 0 else None

    def epoch_to_prune(self, epoch: int) -> int | None:
        if not self.last_n_epochs:
            return None
        old = epoch - self.every_n_epochs * self.last_n_epochs
        return old if old > 0 else None


def remove_saved(output_dir: str, stem: str, extension: str) -> None:
    """Remove a pruned save (file or diffusers folder) and its state folder, if present."""
    for path in (os.path.join(output_dir, stem + extension), os.path.join(output_dir, state_dir_name(stem))):
        if os.path.isdir(path):
            shutil.rmtree(path)
            logger.info("removed old save %s", path)
        elif os.path.isfile(path):
            os.remove(path)
            logger.info("removed old save %s", path)
