"""How a training step is split across processes (`accelerate launch --num_processes N`, DDP).

Owns the three rules that make an N-process run train like a 1-process run with N times the batch:

- Global batches: the dataset chunks each bucket by batch_size * N (`TrainDataset.num_processes`),
  and `rank_shares` gives each process a contiguous, near-equal share of every global batch, so
  every process runs the same number of micro-batches and together they see exactly the samples a
  1-process run with batch N * batch_size sees. A process whose share would be empty (a short last
  batch of a bucket) runs a copy of the first sample with loss weight 0, so the collectives match.
- Loss scale: each process's loss is the sum of its per-sample losses times N / (samples in the
  global batch); DDP averages gradients over processes, which gives the mean over the global batch.
- Per-sample randomness: the VAE's latent sample, the noise and the timesteps of a sample come from
  a generator keyed by (seed, epoch, sample key), not by batch or rank, so they do not depend on how
  samples are grouped (and a resumed run draws the same values).

The trainable modules are prepared as one `library.training.step_loss.TrainableModules` whose
forward runs the denoiser call, so DDP sees a forward and averages every trainable gradient;
`build_accelerator` sets accelerate up for that, and small helpers reduce floats over processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from library.training.step_rng import derive_seed

if TYPE_CHECKING:
    import torch


@dataclass
class RankShare:
    """This process's part of one global batch."""

    refs: list  # list[SampleRef]
    global_size: int  # samples in the whole global batch
    is_padding: bool = False  # an empty share filled with a copy of one sample; its loss counts 0

    def loss_scale(self, num_processes: int) -> float:
        """Multiplier of the summed per-sample losses so the DDP mean is the global-batch mean."""
        return 0.0 if self.is_padding else num_processes / self.global_size


def rank_shares(global_batches: list[list], rank: int, num_processes: int) -> list[RankShare]:
    """Contiguous near-equal shares of each global batch: rank r takes the r-th slice."""
    shares = []
    for refs in global_batches:
        base, extra = divmod(len(refs), num_processes)
        start = rank * base + min(rank, extra)
        size = base + (1 if rank < extra else 0)
        part = refs[start:start + size]
        shares.append(RankShare(part, len(refs)) if part else RankShare(refs[:1], len(refs), is_padding=True))
    return shares


def sample_generators(seed: int, epoch: int, sample_keys: list[str], device, namespace: str = "train") -> list:
    """One torch.Generator per sample, keyed by the sample itself (not its batch or process)."""
    import torch

    generators = []
    for key in sample_keys:
        generator = torch.Generator(device=device)
        generator.manual_seed(derive_seed(namespace, seed, epoch, key))
        generators.append(generator)
    return generators


def noised_inputs(scheme, latents: "torch.Tensor", generators: list, timesteps: Optional["torch.Tensor"] = None):
    """(noisy latents, noise, timesteps) with every draw from the sample's own generator.

    `timesteps` [B] fixes the timesteps (validation); otherwise each sample draws its own.
    """
    import torch

    noisy, noises, drawn = [], [], []
    for index, generator in enumerate(generators):
        sample = latents[index:index + 1]
        noise = scheme.sample_noise(sample, generator)
        t = timesteps[index:index + 1] if timesteps is not None else scheme.sample_timesteps(1, sample.device, generator)
        noisy.append(scheme.add_noise(sample, noise, t, generator))
        noises.append(noise)
        drawn.append(t)
    return torch.cat(noisy), torch.cat(noises), torch.cat(drawn)


def build_accelerator(args):
    """The run's Accelerator: DDP may see unused parameters (LoRA module dropout, cached text
    conditioning), and the LR scheduler steps once per optimizer step whatever the process count."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from library.training.trackers import tracker_names

    log_with = tracker_names(args) or None
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.logging_dir)
    return Accelerator(mixed_precision=args.mixed_precision, log_with=log_with, project_config=project,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                       step_scheduler_with_optimizer=False)


def mean_over_processes(accelerator, value: float) -> float:
    """The mean of a float over all processes (the value itself with one process)."""
    if accelerator.num_processes == 1:
        return value
    import torch

    tensor = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="mean").item()


def sum_over_processes(accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    import torch

    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()

