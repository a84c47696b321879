"""Noise, timesteps, training targets and per-timestep loss weights: the family's noise scheme.

Owns the `NoiseScheme` interface the generic trainer talks to, its DDPM implementation (SD 1.x/2.x,
SDXL: epsilon or v-prediction on diffusers' `DDPMScheduler`), and the noise/loss flags with
sd-scripts' names and meanings: noise offset (random strength, adaptive scale), multi-resolution
(pyramid) noise, input perturbation (ip_noise_gamma), min/max timestep, zero terminal SNR, min-SNR
weighting, v-pred scaling, v-pred-like loss, debiased estimation, and the Huber threshold schedule.
The forward process and velocity come from diffusers (`add_noise`, `get_velocity`, `compute_snr`,
`rescale_betas_zero_snr`); what is written here is the sampling and weighting around them.
Every random draw takes an explicit `torch.Generator`, so a trainer that seeds one generator per
micro-batch gets bit-identical runs (and exact resume) without touching the global RNG.
"""

from __future__ import annotations

import argparse
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from library.errors import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CLAMP = 1000.0  # sd-scripts caps SNR here for its v-pred scale and debiased weights (t=0 is ~1175)


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("noise, timesteps and loss")
    group.add_argument("--noise_offset", type=float, default=None,
                       help="add per-channel offset noise of this strength (around 0.1 is common)")
    group.add_argument("--noise_offset_random_strength", action="store_true",
                       help="draw the offset strength uniformly in [0, noise_offset) each batch")
    group.add_argument("--adaptive_noise_scale", type=float, default=None,
                       help="add |latent mean| * this value to noise_offset (needs --noise_offset)")
    group.add_argument("--multires_noise_iterations", type=int, default=None,
                       help="enable multi-resolution (pyramid) noise with this many levels (6-10 is common)")
    group.add_argument("--multires_noise_discount", type=float, default=0.3,
                       help="weight decay per pyramid level (needs --multires_noise_iterations)")
    group.add_argument("--ip_noise_gamma", type=float, default=None,
                       help="input perturbation noise strength (around 0.1); perturbs the model input only")
    group.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                       help="draw the perturbation strength uniformly in [0, ip_noise_gamma) each batch")
    group.add_argument("--min_timestep", type=int, default=None, help="smallest training timestep (default 0)")
    group.add_argument("--max_timestep", type=int, default=None,
                       help="training timesteps are below this value (default: the scheduler's 1000)")
    group.add_argument("--zero_terminal_snr", action="store_true",
                       help="rescale the betas so the last timestep is pure noise (use with v-prediction)")
    group.add_argument("--min_snr_gamma", type=float, default=None,
                       help="min-SNR loss weighting with this gamma (5 is the paper's value)")
    group.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                       help="scale the v-prediction loss like a noise-prediction loss (v-prediction only)")
    group.add_argument("--v_pred_like_loss", type=float, default=None,
                       help="add a v-prediction-like loss of this weight (epsilon models only)")
    group.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    group.add_argument("--loss_type", choices=LOSS_TYPES, default="l2", help="elementwise loss (default l2)")
    group.add_argument("--huber_schedule", choices=HUBER_SCHEDULES, default="snr",
                       help="how the Huber threshold varies with the timestep (huber/smooth_l1 only)")
    group.add_argument("--huber_c", type=float, default=0.1, help="Huber threshold parameter (default 0.1)")
    group.add_argument("--huber_scale", type=float, default=1.0,
                       help="multiplier of the Huber threshold (constant and exponential schedules)")


class NoiseScheme(ABC):
    """How one family turns clean latents into a training example and weighs its loss.

    The trainer calls, per batch: `sample_noise`, `sample_timesteps`, `add_noise` (the denoiser gets
    the noisy latents and `model_timesteps(t)`), turns its output into a prediction with
    `prediction_for_loss`, then compares that with `target` using
    `huber_c(t)` and multiplies the per-sample loss by `loss_weights(t)`.
    """

    @abstractmethod
    def sample_noise(self, latents: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
        """The noise the target is built from (same shape and dtype as latents)."""

    @abstractmethod
    def sample_timesteps(self, batch_size: int, device, generator: "torch.Generator") -> "torch.Tensor":
        """One training timestep per sample, in the scheme's own units."""

    @abstractmethod
    def add_noise(self, latents: "torch.Tensor", noise: "torch.Tensor", t: "torch.Tensor",
                  generator: Optional["torch.Generator"] = None) -> "torch.Tensor":
        """The denoiser's input; schemes with input perturbation need the generator."""

    @abstractmethod
    def target(self, latents: "torch.Tensor", noise: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        """What the denoiser should predict."""

    @abstractmethod
    def loss_weights(self, t: "torch.Tensor") -> "torch.Tensor":
        """Per-sample float32 multipliers of the loss, shape [B]."""

    @abstractmethod
    def model_timesteps(self, t: "torch.Tensor") -> "torch.Tensor":
        """The timestep values the denoiser receives."""

    @abstractmethod
    def huber_c(self, t: "torch.Tensor") -> Optional["torch.Tensor"]:
        """Per-sample Huber threshold [B] for huber/smooth_l1 losses, None for l1/l2."""

    def prediction_for_loss(self, output: "torch.Tensor", noisy: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        """The denoiser's output turned into what `target` is (flow matching's --model_prediction_type)."""
        return output

    def metadata(self) -> dict[str, str]:
        """ss_* keys describing this objective for saved files (beyond the trainer's generic ones)."""
        return {}


@dataclass(frozen=True)
class DDPMNoiseOptions:
    """The noise/loss flags a DDPM scheme uses; defaults are sd-scripts' (everything off, l2)."""

    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None
    min_snr_gamma: Optional[float] = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: Optional[float] = None
    debiased_estimation_loss: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DDPMNoiseOptions":
        names = cls.__dataclass_fields__.keys()
        return cls(**{name: getattr(args, name) for name in names})


def _validate_noise_flags(o: DDPMNoiseOptions) -> None:
    if o.adaptive_noise_scale is not None and not o.noise_offset:
        raise UserError("--adaptive_noise_scale needs --noise_offset (it adds to the offset strength)")
    if o.noise_offset_random_strength and not o.noise_offset:
        raise UserError("--noise_offset_random_strength needs --noise_offset")
    if o.ip_noise_gamma_random_strength and not o.ip_noise_gamma:
        raise UserError("--ip_noise_gamma_random_strength needs --ip_noise_gamma")
    if o.multires_noise_iterations is not None and o.multires_noise_iterations < 0:
        raise UserError(f"--multires_noise_iterations must be 0 or more (got {o.multires_noise_iterations})")
    if o.multires_noise_discount != 0.3 and not o.multires_noise_iterations:
        raise UserError("--multires_noise_discount needs --multires_noise_iterations")


def _validate_timestep_range(o: DDPMNoiseOptions, num_train_timesteps: int) -> None:
    low = 0 if o.min_timestep is None else o.min_timestep
    high = num_train_timesteps if o.max_timestep is None else o.max_timestep
    if not 0 <= low <= high <= num_train_timesteps or low == num_train_timesteps:
        raise UserError(
            f"--min_timestep {low} / --max_timestep {high}: need 0 <= min <= max <= {num_train_timesteps} "
            f"and min < {num_train_timesteps} (min == max trains that one timestep)"
        )


def _validate_weighting(o: DDPMNoiseOptions, prediction_type: str, zero_terminal_snr: bool) -> None:
    v_pred = prediction_type == "v_prediction"
    if o.min_snr_gamma is not None and o.min_snr_gamma <= 0:
        raise UserError(f"--min_snr_gamma must be positive (got {o.min_snr_gamma}); 5 is the usual value")
    if o.scale_v_pred_loss_like_noise_pred and not v_pred:
        raise UserError("--scale_v_pred_loss_like_noise_pred works only with a v-prediction model "
                        "(add --v_parameterization for v-models or drop the flag)")
    if o.v_pred_like_loss and v_pred:
        raise UserError("--v_pred_like_loss cannot be used with a v-prediction model; drop the flag")
    if zero_terminal_snr and not v_pred:
        logger.warning("--zero_terminal_snr without v-prediction: the last timestep has no signal to "
                       "predict noise from; training results may be unexpected")
        if o.debiased_estimation_loss or o.v_pred_like_loss:
            raise UserError("--zero_terminal_snr with an epsilon model gives an infinite loss weight at the "
                            "last timestep with --debiased_estimation_loss or --v_pred_like_loss; "
                            "use --v_parameterization or drop one of them")


def _validate_huber(o: DDPMNoiseOptions) -> None:
    if o.loss_type not in LOSS_TYPES:
        raise UserError(f"--loss_type {o.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if o.huber_schedule not in HUBER_SCHEDULES:
        raise UserError(f"--huber_schedule {o.huber_schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")
    if o.loss_type not in ("huber", "smooth_l1"):
        changed = [name for name, default in (("huber_schedule", "snr"), ("huber_c", 0.1), ("huber_scale", 1.0))
                   if getattr(o, name) != default]
        if changed:
            raise UserError(f"--{changed[0]} only affects --loss_type huber or smooth_l1 (got {o.loss_type})")
        return
    if o.huber_c <= 0 or (o.huber_schedule == "snr" and o.huber_c > 1):
        raise UserError(f"--huber_c must be positive (at most 1 for the snr schedule), got {o.huber_c}")
    if o.huber_schedule == "snr" and o.huber_scale != 1.0:
        raise UserError("--huber_scale has no effect with --huber_schedule snr (as in sd-scripts); "
                        "use the constant or exponential schedule or drop --huber_scale")


def offset_noise(latents, noise, strength, adaptive_scale, generator):
    """Adds a per-(sample, channel) constant shift of `strength` (plus |latent mean| * adaptive_scale)."""
    import torch

    if adaptive_scale is not None:
        latent_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + adaptive_scale * latent_mean, min=0.0)
    shift = _randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents.device)
    return noise + (strength * shift).to(noise.dtype)


def pyramid_noise(noise, iterations: int, discount: float, generator):
    """Multi-resolution noise: adds upsampled coarser noise levels, then renormalizes to unit std."""
    import torch.nn.functional as F

    batch, channels, height, width = noise.shape
    result = noise.float()
    for level in range(iterations):
        ratio = 2.0 + 2.0 * _rand((1,), generator, "cpu").item()  # each level 2x-4x coarser
        coarse_h = max(1, int(height / ratio**level))
        coarse_w = max(1, int(width / ratio**level))
        coarse = _randn((batch, channels, coarse_h, coarse_w), generator, noise.device)
        result = result + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if coarse_h == 1 or coarse_w == 1:
            break
    return (result / result.std()).to(noise.dtype)


def _randn(shape, generator, device):
    import torch

    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _rand(shape, generator, device):
    import torch

    return torch.rand(shape, generator=generator, device=generator.device).to(device)


class DDPMNoiseScheme(NoiseScheme):
    """Discrete-time DDPM training (epsilon or v-prediction) on a diffusers DDPMScheduler."""

    def __init__(self, scheduler, options: DDPMNoiseOptions = DDPMNoiseOptions(), zero_terminal_snr: bool = False):
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"the model's scheduler predicts {self.prediction_type!r}; "
                            "training supports epsilon and v_prediction models")
        if zero_terminal_snr:
            scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)
        self.scheduler = scheduler
        self.options = options
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        _validate_noise_flags(options)
        _validate_timestep_range(options, self.num_train_timesteps)
        _validate_weighting(options, self.prediction_type, zero_terminal_snr)
        _validate_huber(options)

    @classmethod
    def from_args(cls, scheduler, args: argparse.Namespace) -> "DDPMNoiseScheme":
        return cls(scheduler, DDPMNoiseOptions.from_args(args), bool(args.zero_terminal_snr))

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    # ----- noise and timesteps -----------------------------------------------------------------
    def sample_noise(self, latents, generator):
        o = self.options
        noise = _randn(latents.shape, generator, latents.device).to(latents.dtype)
        if o.noise_offset:
            strength = o.noise_offset
            if o.noise_offset_random_strength:
                strength = _rand((1,), generator, latents.device) * o.noise_offset
            noise = offset_noise(latents, noise, strength, o.adaptive_noise_scale, generator)
        if o.multires_noise_iterations:
            noise = pyramid_noise(noise, o.multires_noise_iterations, o.multires_noise_discount, generator)
        return noise

    def sample_timesteps(self, batch_size, device, generator):
        import torch

        low = self.options.min_timestep or 0
        high = self.num_train_timesteps if self.options.max_timestep is None else self.options.max_timestep
        if low == high:
            return torch.full((batch_size,), low, dtype=torch.long, device=device)
        t = torch.randint(low, high, (batch_size,), generator=generator, device=generator.device)
        return t.to(device)

    def add_noise(self, latents, noise, t, generator=None):
        gamma = self.options.ip_noise_gamma
        if gamma:
            if generator is None:
                raise ValueError("ip_noise_gamma is set: pass the batch generator to add_noise")
            strength = gamma
            if self.options.ip_noise_gamma_random_strength:
                strength = _rand((1,), generator, latents.device) * gamma
            perturbation = _randn(latents.shape, generator, latents.device).to(latents.dtype)
            noise = noise + strength * perturbation  # the target keeps the unperturbed noise
        return self.scheduler.add_noise(latents, noise, t)

    def target(self, latents, noise, t):
        if self.v_prediction:
            return self.scheduler.get_velocity(latents, noise, t)
        return noise

    def model_timesteps(self, t):
        return t

    # ----- loss weighting ----------------------------------------------------------------------
    def snr(self, t):
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each timestep, float32 [B]."""
        from diffusers.training_utils import compute_snr

        return compute_snr(self.scheduler, t)

    def loss_weights(self, t):
        import torch

        o = self.options
        snr = self.snr(t)
        weights = torch.ones_like(snr)
        clamped = torch.clamp(snr, max=SNR_CLAMP)
        if o.min_snr_gamma is not None:
            weights = weights * self._min_snr_weight(snr, o.min_snr_gamma)
        if o.scale_v_pred_loss_like_noise_pred:
            weights = weights * clamped / (clamped + 1)
        if o.v_pred_like_loss:
            # sd-scripts adds loss + loss / scale * k, which is loss * (1 + k / scale): one more factor
            weights = weights * (1 + o.v_pred_like_loss * (clamped + 1) / clamped)
        if o.debiased_estimation_loss:
            weights = weights * (1 / (clamped + 1) if self.v_prediction else 1 / torch.sqrt(clamped))
        return weights

    def _min_snr_weight(self, snr, gamma: float):
        import torch

        if self.v_prediction:
            return torch.clamp(snr, max=gamma) / (snr + 1)
        # min(snr, gamma) / snr written so that snr == 0 (zero terminal SNR) gives 1, not 0/0
        return gamma / torch.clamp(snr, min=gamma)

    def huber_c(self, t):
        import torch

        o = self.options
        if o.loss_type not in ("huber", "smooth_l1"):
            return None
        if o.huber_schedule == "constant":
            return torch.full(t.shape, o.huber_c * o.huber_scale, device=t.device)
        if o.huber_schedule == "exponential":
            decay = -math.log(o.huber_c) / self.num_train_timesteps
            return torch.exp(-decay * t.float()) * o.huber_scale
        alphas_cumprod = self.scheduler.alphas_cumprod.to(t.device)[t].float()
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - o.huber_c) / (1 + sigmas) ** 2 + o.huber_c
