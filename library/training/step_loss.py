"""The loss of one batch, shared by training steps and validation, and the non-finite loss guard.

`StepLoss` turns a batch from `TrainDataset.make_batch` into per-sample weighted losses: latents
(cached or VAE-encoded), conditioning (cached or encoded by the family's strategies), noised inputs
from the family's noise scheme with one generator per sample (library/training/distributed.py),
the family's denoiser call, the scheme's conversion of its output into a prediction, and the loss with the scheme's per-timestep weights. Validation calls
it with fixed timesteps and its own generators; training runs the denoiser call through the
prepared `TrainableModules` so DDP averages the gradients.

`NonFiniteGuard` counts consecutive optimizer steps whose loss was NaN or inf (those steps are
skipped) and stops the run with a UserError after --max_nonfinite_steps of them.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import nn

from library.errors import UserError
from library.training.distributed import noised_inputs

logger = logging.getLogger(__name__)


class TrainableModules(nn.Module):
    """The trainable modules as one module whose forward(run) returns run(): accelerate prepares
    this (DDP with several processes) and the denoiser call runs through it."""

    def __init__(self, modules: list):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        return run()


def _direct(run: Callable[[], torch.Tensor]) -> torch.Tensor:
    return run()


class StepLoss:
    """Per-sample losses of a batch for one family, mode and set of components."""

    def __init__(self, family, components, args, accelerator, latents_strategy, weight_dtype,
                 trains_text_encoder: bool):
        self.family, self.components, self.args, self.accelerator = family, components, args, accelerator
        self.latents_strategy, self.weight_dtype = latents_strategy, weight_dtype
        self.trains_text_encoder = trains_text_encoder
        self.tokenize = family.tokenize_strategy(args, components)
        self.encode_text = family.text_encoding_strategy(args)
        self.noise = family.noise_scheme(args, components)

    def latents(self, batch: dict, generators: list) -> torch.Tensor:
        """Cached latents, or the VAE's sample with each sample's own generator."""
        device = self.accelerator.device
        if "latents" in batch:
            return batch["latents"].to(device, dtype=torch.float32)
        vae = self.components.vae
        with torch.no_grad():
            images = batch["images"].to(device, dtype=next(vae.parameters()).dtype)
            return self.latents_strategy.encode(vae, images, generator=generators).to(torch.float32)

    def conditioning(self, batch: dict, training: bool) -> dict:
        device = self.accelerator.device
        if "conditioning" in batch:  # cached text-encoder outputs
            return {k: v.to(device) for k, v in batch["conditioning"].items()}
        tokens = [{k: v.to(device) for k, v in part.items()} for part in self.tokenize.tokenize(batch["captions"])]
        with torch.set_grad_enabled(training and self.trains_text_encoder):
            return self.encode_text.encode(self.components.text_encoders, tokens)

    def sample_losses(self, batch: dict, generators: list, timesteps: Optional[torch.Tensor] = None,
                      forward: Callable = _direct, training: bool = True) -> torch.Tensor:
        """Weighted loss of each sample [B] (float32). `forward` runs the denoiser-call closure."""
        from library.training.losses import per_sample_loss

        latents = self.latents(batch, generators)
        conditioning = self.conditioning(batch, training)
        noisy, noise, t = noised_inputs(self.noise, latents, generators, timesteps)

        def predict() -> torch.Tensor:
            with self.accelerator.autocast():
                return self.family.predict(self.components, noisy.to(self.weight_dtype),
                                           self.noise.model_timesteps(t), conditioning, batch)

        prediction = self.noise.prediction_for_loss(forward(predict).float(), noisy, t)
        target = self.noise.target(latents, noise, t)
        mask = batch.get("alpha_masks")
        if mask is not None:
            mask = mask.to(latents.device)
        losses = per_sample_loss(prediction.float(), target.float(), self.args.loss_type, self.noise.huber_c(t), mask)
        weights = self.noise.loss_weights(t) * batch["loss_weights"].to(latents.device)
        return losses * weights


class NonFiniteGuard:
    """Stops training after `limit` consecutive steps with a NaN/inf loss (each one is skipped)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak_start: Optional[int] = None
        self.streak = 0

    @property
    def in_streak(self) -> bool:
        return self.streak > 0

    def record(self, step: int, finite: bool, last_saves: str) -> None:
        if finite:
            self.streak, self.streak_start = 0, None
            return
        self.streak += 1
        self.streak_start = self.streak_start or step
        logger.warning("step %d: the loss is NaN or inf; skipped this optimizer step (%d of %d in a row)",
                       step, self.streak, self.limit)
        if self.streak >= self.limit:
            steps = f"step {step}" if self.streak == 1 else f"steps {self.streak_start}-{step}"
            raise UserError(
                f"training stopped at step {step}: the loss was NaN or inf at {steps} "
                f"(--max_nonfinite_steps {self.limit}); {last_saves}. Lower the learning rate, check "
                "--network_weights and the images, or use --mixed_precision bf16 instead of fp16")
