"""Validation loss: which images are held out, and scoring them comparably across steps and runs.

Held-out images come from `validation_split` (a [general] or [[datasets]] option, or the
--validation_split flag, as in sd-scripts): per dataset, its non-regularisation images, sorted by
path and shuffled by `validation_seed` (default: the training seed), the last
`n - ceil(n * (1 - split))` are validation images and never trained on (split 1: all of them, as in
sd-scripts). A whole `[[datasets]]` with `is_validation = true` is validation data too. Each validation image counts once (num_repeats 1).

Each validation batch is scored at fixed timesteps (sd-scripts' choice: 4 evenly spaced, 200/400/
600/800 of 1000 for DDPM, sigma 0.2/0.4/0.6/0.8 for flow matching; a noise scheme may define
`validation_timesteps(count, device)` instead) with noise from generators keyed by (validation seed,
timestep, sample), independent of the training RNG; captions and augmentations are those of epoch 1,
so the same weights always give the same val/loss. Trainable modules run in eval mode (no dropout).
The loss is logged as `val/loss` (TensorBoard through accelerate) and printed; with several
processes each scores a share of the batches and the sums are combined.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
from typing import TYPE_CHECKING, Optional

from library.errors import UserError

if TYPE_CHECKING:
    import torch

    from library.config.dataset_spec import DatasetGroupSpec
    from library.data.dataset import TrainDataset

logger = logging.getLogger(__name__)

VALIDATION_TIMESTEP_COUNT = 4
VALIDATION_EPOCH = 1  # captions and augmentations of validation samples are those of this epoch


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation loss")
    group.add_argument("--validation_split", type=float, default=None, metavar="X",
                       help="hold out this fraction of each dataset's images for validation (dataset option "
                            "validation_split; default 0)")
    group.add_argument("--validation_seed", type=int, metavar="N", default=None,
                       help="seed of the validation split and of the validation noise (default: --seed)")
    group.add_argument("--validate_every_n_steps", type=int, metavar="N", default=None, help="compute val/loss every N steps")
    group.add_argument("--validate_every_n_epochs", type=int, metavar="N", default=None,
                       help="compute val/loss every N epochs (default: every epoch when there are validation images)")
    group.add_argument("--max_validation_steps", type=int, metavar="N", default=None,
                       help="score at most N validation batches each time (default: all)")


def validate_validation_args(args: argparse.Namespace) -> None:
    for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    if args.validation_split is not None and not 0 <= args.validation_split <= 1:
        raise UserError(f"--validation_split must be from 0 to 1 (got {args.validation_split}); 1 makes every "
                        "image validation data, which a [[datasets]] table says with is_validation = true")


# ---- which images are validation images ----------------------------------------------------------

def split_entries(datasets: list, scanned: list, default_seed: int) -> tuple[list, list]:
    """(training entries, validation entries) of the scanned entries of `datasets` (DatasetSpec list)."""
    validation_paths: set[tuple[int, str]] = set()
    for index, spec in enumerate(datasets):
        if spec.is_validation:
            validation_paths |= {(index, e.image_path) for e in scanned if e.dataset_index == index}
        elif spec.validation_split:
            seed = spec.validation_seed if spec.validation_seed is not None else default_seed
            paths = sorted({e.image_path for e in scanned if e.dataset_index == index and not e.is_reg})
            random.Random(f"validation:{seed}").shuffle(paths)
            held_out = paths[math.ceil(len(paths) * (1 - spec.validation_split)):]
            if not held_out:
                logger.warning("dataset %d: validation_split %s of %d images holds out no image", index,
                               spec.validation_split, len(paths))
            validation_paths |= {(index, path) for path in held_out}
    train = [e for e in scanned if (e.dataset_index, e.image_path) not in validation_paths]
    validation = [dataclasses.replace(e, num_repeats=1)  # each held-out image is scored once
                  for e in scanned if (e.dataset_index, e.image_path) in validation_paths and not e.is_reg]
    return train, validation


def build_datasets(spec: "DatasetGroupSpec", seed: int, prior_loss_weight: float,
                   max_train_steps: Optional[int]) -> tuple["TrainDataset", Optional["TrainDataset"]]:
    """The training dataset and the validation dataset (None without validation images)."""
    from library.data.dataset import TrainDataset, scan_entries

    scanned = scan_entries(spec)
    train_entries, validation_entries = split_entries(spec.datasets, scanned, seed)
    if validation_entries and not any(not entry.is_reg for entry in train_entries):
        raise UserError(f"every training image of {spec.source} is validation data (validation_split 1 or "
                        "is_validation = true): add a [[datasets]] to train on, or lower validation_split")
    train = TrainDataset(spec.datasets, train_entries, seed, prior_loss_weight, max_train_steps, spec.source)
    train.log_summary()
    if not validation_entries:
        return train, None
    validation = TrainDataset(spec.datasets, validation_entries, seed, prior_loss_weight, max_train_steps, spec.source)
    logger.info("validation: %d images held out", len(validation.entries))
    return train, validation


# ---- scoring ----------------------------------------------------------------------------------

def fixed_timesteps(scheme, count: int, device) -> "torch.Tensor":
    """The validation timesteps of a noise scheme, in its own units."""
    import numpy as np
    import torch

    from library.training.noise import DDPMNoiseScheme

    own = getattr(scheme, "validation_timesteps", None)
    if callable(own):
        return own(count, device)
    if isinstance(scheme, DDPMNoiseScheme):
        low = scheme.options.min_timestep or 0
        high = scheme.num_train_timesteps if scheme.options.max_timestep is None else scheme.options.max_timestep
        values = np.linspace(low, high, count + 2, dtype=int)[1:-1]
        return torch.tensor(values, dtype=torch.long, device=device)
    # continuous-time schemes (flow matching: t is sigma in [0, 1])
    return torch.tensor([(i + 1) / (count + 1) for i in range(count)], dtype=torch.float32, device=device)


class Validator:
    """Computes val/loss of the current weights over the validation dataset."""

    def __init__(self, dataset: "TrainDataset", step_loss, accelerator, args, seed: int, trainable_modules: list,
                 max_train_steps: int):
        self.dataset, self.step_loss, self.accelerator, self.args = dataset, step_loss, accelerator, args
        self.seed = args.validation_seed if args.validation_seed is not None else seed
        self.trainable_modules = trainable_modules
        self.max_train_steps = max_train_steps
        batches = dataset.batches_for_epoch(VALIDATION_EPOCH)
        self.batches = batches[: args.max_validation_steps] if args.max_validation_steps else batches
        self.timesteps = fixed_timesteps(step_loss.noise, VALIDATION_TIMESTEP_COUNT, accelerator.device)
        self.last_step: Optional[int] = None

    def due_at_step(self, step: int) -> bool:
        every = self.args.validate_every_n_steps
        return bool(every) and step % every == 0

    def due_at_epoch(self, epoch: int, step: int) -> bool:
        every = self.args.validate_every_n_epochs
        return (epoch % every == 0 if every else True) and step != self.last_step

    def run(self, step: int) -> float:
        value = self.loss()
        self.last_step = step
        self.accelerator.log({"val/loss": value}, step=step)
        logger.info("step %d: val/loss %.6f (%d batches x %d timesteps)", step, value, len(self.batches),
                    len(self.timesteps))
        return value

    def loss(self) -> float:
        """Mean weighted loss over the validation samples and the fixed timesteps."""
        import torch

        from library.training.distributed import sample_generators, sum_over_processes
        from library.training.step_rng import derive_seed

        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        modes = [(module, module.training) for module in self.trainable_modules]
        for module, _ in modes:
            module.eval()
        total, count = 0.0, 0
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        try:
            # fork_rng: the global RNG (VAE latent sampling) is seeded here and restored afterwards
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                for number, refs in enumerate(self.batches[rank::world]):
                    batch = self.dataset.make_batch(refs, VALIDATION_EPOCH, self.max_train_steps)
                    size = len(batch["sample_keys"])
                    for index, timestep in enumerate(self.timesteps):
                        torch.manual_seed(derive_seed("validation", self.seed, rank + number * world, index))
                        generators = sample_generators(self.seed, index, batch["sample_keys"], self.accelerator.device,
                                                       namespace="validation")
                        losses = self.step_loss.sample_losses(batch, generators, timestep.repeat(size), training=False)
                        total += losses.sum().item()
                        count += size
        finally:
            for module, was_training in modes:
                module.train(was_training)
        total, count = sum_over_processes(self.accelerator, [total, float(count)])
        return total / count
