"""Rectified-flow (flow matching) training: timestep sampling, noisy inputs, targets and loss weights.

Owns `FlowMatchingNoiseScheme` (the `NoiseScheme` of FLUX.1, SD3/SD3.5 and Lumina 2), its flags with
sd-scripts' names and formulas (library/flux_train_utils.py, lumina_train_util.py, sd3_train_utils.py
there), and each family's defaults for them (`FLUX_OBJECTIVE`, `LUMINA_OBJECTIVE`, `SD3_OBJECTIVE`;
docs/training.md compares them with sd-scripts'):

- `--timestep_sampling`: `sigma` draws u from `compute_density_for_timestep_sampling` (diffusers;
  uniform, logit_normal or mode by `--weighting_scheme`) and takes sigma from the table of a
  `FlowMatchEulerDiscreteScheduler(shift=--discrete_flow_shift)` at index u * 1000; `uniform` sigma = u;
  `sigmoid` sigma = sigmoid(sigmoid_scale * n); `shift` t = sigmoid(sigmoid_scale * n) then
  sigma = shift * t / (1 + (shift - 1) * t); `flux_shift` the same t through FLUX's resolution-dependent
  shift exp(mu) / (exp(mu) + 1/t - 1), with mu linear in the packed sequence length (h/2)*(w/2)
  from 0.5 at 256 to 1.15 at 4096 tokens; `nextdit_shift` (sd-scripts' Lumina mode) that shift in
  reversed time, sigma = 1 - flux_time_shift(1 - t, mu).
- `--min_timestep`/`--max_timestep` (thousandths of sigma) squeeze every draw into [min, max] / 1000
  as sd-scripts' SD3 does (u * (max - min) + min).
- noisy = (1 - sigma) * latents + sigma * noise (plus sigma * gamma * xi with --ip_noise_gamma); the
  denoiser receives sigma (times `model_timestep_scale`, or 1 - sigma for models that count time the
  other way, like Lumina 2).
- `--model_prediction_type`, applied by `prediction_for_loss` to the denoiser's output (the step loss
  calls it, because it needs the noisy input): raw (the output is the velocity, compared with
  noise - latents), additive (output + noisy, compared with noise - latents) or sigma_scaled (an x0
  estimate noisy - sigma * velocity, compared with the latents and weighted by
  `compute_loss_weighting_for_sd3` for sigma_sqrt/cosmap). A model whose velocity points the other
  way (Lumina 2: latents - noise) has `output_sign` -1: its raw/additive target is latents - noise,
  as in sd-scripts, and its x0 estimate is noisy + sigma * output.

The DDPM-only flags (min SNR, v-prediction, noise offset, ...) are registered hidden so that the
trainer's metadata can read them, and rejected by `reject_ddpm_flags` with a message naming the flag.
Every random draw takes the explicit generator, so runs are reproducible and resumable.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Optional

from library.errors import UserError
from library.training.noise import NoiseScheme

if TYPE_CHECKING:
    import torch

TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift")
WEIGHTING_SCHEMES = ("uniform", "none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
FLOW_LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
FLOW_HUBER_SCHEDULES = ("constant", "exponential")  # "snr" needs a DDPM noise schedule
NUM_TRAIN_TIMESTEPS = 1000
# FLUX's shift of sigma with image size: mu = 0.5 at 256 packed tokens, 1.15 at 4096 (BFL's sampling code)
FLUX_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))

# flags that only a DDPM objective has: dest -> value when not given
DDPM_ONLY_FLAGS = {
    "noise_offset": None, "noise_offset_random_strength": False, "adaptive_noise_scale": None,
    "multires_noise_iterations": None, "multires_noise_discount": None, "zero_terminal_snr": False,
    "min_snr_gamma": None, "scale_v_pred_loss_like_noise_pred": False, "v_pred_like_loss": None,
    "debiased_estimation_loss": False, "v_parameterization": False,
}


@dataclass(frozen=True)
class FlowMatchingDefaults:
    """A family's defaults for the flags that choose its training objective (docs/training.md has
    them next to sd-scripts' and says why they differ)."""

    timestep_sampling: str = "sigma"
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "raw"


# FLUX: sd-scripts' sampling; raw instead of sd-scripts' sigma_scaled (whose target did not match it)
FLUX_OBJECTIVE = FlowMatchingDefaults(timestep_sampling="sigma", discrete_flow_shift=3.0, model_prediction_type="raw")
# Lumina 2: sd-scripts' lumina_train_network.py defaults
LUMINA_OBJECTIVE = FlowMatchingDefaults(timestep_sampling="shift", discrete_flow_shift=6.0, model_prediction_type="raw")
# SD3: no such flags; the MMDiT output is always preconditioned into an x0 estimate (sd3_train_utils)
SD3_OBJECTIVE = FlowMatchingDefaults(timestep_sampling="sigma", discrete_flow_shift=3.0,
                                     model_prediction_type="sigma_scaled")


def add_timestep_range_arguments(group) -> None:
    group.add_argument("--min_timestep", type=int, default=None,
                       help="smallest training timestep in thousandths of sigma (0-1000, default 0)")
    group.add_argument("--max_timestep", type=int, default=None,
                       help="largest training timestep in thousandths of sigma (0-1000, default 1000)")


def add_flow_matching_arguments(parser: argparse.ArgumentParser, defaults: FlowMatchingDefaults) -> None:
    group = parser.add_argument_group("flow matching: timesteps, target and loss")
    group.add_argument("--timestep_sampling", choices=TIMESTEP_SAMPLINGS, default=None,
                       help="how sigma is drawn: sigma (scheduler table, see --weighting_scheme), uniform, "
                            "sigmoid, shift (--discrete_flow_shift), flux_shift or nextdit_shift (by resolution); "
                            f"default {defaults.timestep_sampling}")
    group.add_argument("--sigmoid_scale", type=float, default=None,
                       help="scale of the normal draw before the sigmoid (sigmoid/shift/flux_shift/nextdit_shift; "
                            "default 1.0)")
    group.add_argument("--discrete_flow_shift", type=float, default=None,
                       help=f"shift of sigma for --timestep_sampling shift and sigma (default {defaults.discrete_flow_shift})")
    group.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default=None,
                       help="logit_normal/mode: density of u for --timestep_sampling sigma; sigma_sqrt/cosmap: "
                            "loss weights with --model_prediction_type sigma_scaled; default uniform (= none)")
    group.add_argument("--logit_mean", type=float, default=None, help="mean for logit_normal (default 0.0)")
    group.add_argument("--logit_std", type=float, default=None, help="std for logit_normal (default 1.0)")
    group.add_argument("--mode_scale", type=float, default=None, help="scale for the mode scheme (default 1.29)")
    group.add_argument("--model_prediction_type", choices=MODEL_PREDICTION_TYPES, default=None,
                       help="raw (the velocity, compared with noise - latents), additive (+ noisy input) or "
                            "sigma_scaled (x0 estimate noisy - sigma * output, compared with the latents); "
                            f"default {defaults.model_prediction_type}")
    add_flow_loss_arguments(parser, group)


def add_flow_loss_arguments(parser: argparse.ArgumentParser, group) -> None:
    """The flags every flow-matching family shares after its timestep flags: the timestep range, input
    perturbation, the loss and its Huber threshold, and the hidden DDPM-only flags."""
    add_timestep_range_arguments(group)
    group.add_argument("--ip_noise_gamma", type=float, default=None,
                       help="input perturbation noise strength (around 0.1); perturbs the model input only")
    group.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                       help="draw the perturbation strength uniformly in [0, ip_noise_gamma) each batch")
    group.add_argument("--loss_type", choices=FLOW_LOSS_TYPES, default="l2", help="elementwise loss (default l2)")
    group.add_argument("--huber_schedule", choices=FLOW_HUBER_SCHEDULES, default="constant",
                       help="Huber threshold over time (huber/smooth_l1 only): constant (default) or exponential")
    group.add_argument("--huber_c", type=float, default=0.1, help="Huber threshold parameter (default 0.1)")
    group.add_argument("--huber_scale", type=float, default=1.0, help="multiplier of the Huber threshold")
    add_hidden_ddpm_flags(parser)


def add_hidden_ddpm_flags(parser: argparse.ArgumentParser) -> None:
    """Accepted by the parser (and read by the metadata) but rejected by reject_ddpm_flags."""
    existing = {action.dest for action in parser._actions}
    for dest, default in DDPM_ONLY_FLAGS.items():
        if dest in existing:
            continue
        if default is False:
            parser.add_argument(f"--{dest}", action="store_true", help=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{dest}", type=float, default=None, help=argparse.SUPPRESS)


def reject_ddpm_flags(args: argparse.Namespace, model_name: str) -> None:
    for dest, default in DDPM_ONLY_FLAGS.items():
        if getattr(args, dest, default) not in (default, None):
            raise UserError(
                f"--{dest} belongs to DDPM training (SD 1.x/2.x, SDXL); {model_name} trains with flow matching, "
                "where it has no meaning. Remove it (flow matching uses --timestep_sampling, --weighting_scheme "
                "and --model_prediction_type)"
            )


@dataclass(frozen=True)
class FlowMatchingOptions:
    """The flow-matching flags after validation, with the family's defaults filled in."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    model_prediction_type: str = "raw"
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "constant"
    huber_c: float = 0.1
    huber_scale: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace, defaults: FlowMatchingDefaults) -> "FlowMatchingOptions":
        """Validate the flags (UserError for contradictions and flags without effect) and fill defaults."""
        base = cls(**{f.name: getattr(defaults, f.name) for f in fields(defaults)})
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        options = replace(base, **given)
        _validate(options, given, base)
        return options

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(lowest, highest) sigma that --min_timestep/--max_timestep allow."""
        low = 0 if self.min_timestep is None else self.min_timestep
        high = NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep
        return low / NUM_TRAIN_TIMESTEPS, high / NUM_TRAIN_TIMESTEPS

    def metadata(self) -> dict[str, str]:
        """sd-scripts' ss_* keys for these settings (FLUX/Lumina training scripts write the same)."""
        keys = ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type",
                "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "min_timestep", "max_timestep",
                "ip_noise_gamma", "loss_type")
        return {f"ss_{key}": str(getattr(self, key)) for key in keys}


def _uses_sigmoid(options: FlowMatchingOptions) -> bool:
    return options.timestep_sampling in ("sigmoid", "shift", "flux_shift", "nextdit_shift")


def _reject_unless(given: dict, base: FlowMatchingOptions, name: str, effective: bool, why: str) -> None:
    """A flag the user set to a non-default value that this combination ignores is an error."""
    if name in given and given[name] != getattr(base, name) and not effective:
        raise UserError(f"--{name} {given[name]} has no effect: {why}")


def _validate(o: FlowMatchingOptions, given: dict, base: FlowMatchingOptions) -> None:
    _reject_unless(given, base, "sigmoid_scale", _uses_sigmoid(o),
                   "it scales the draw of --timestep_sampling sigmoid, shift, flux_shift and nextdit_shift")
    _reject_unless(given, base, "discrete_flow_shift", o.timestep_sampling in ("shift", "sigma"),
                   "it is used by --timestep_sampling shift and sigma")
    scheme = o.weighting_scheme
    if scheme in ("logit_normal", "mode"):
        _reject_unless(given, base, "weighting_scheme", o.timestep_sampling == "sigma",
                       f"{scheme} shapes the timestep density of --timestep_sampling sigma only")
    if scheme in ("sigma_sqrt", "cosmap"):
        _reject_unless(given, base, "weighting_scheme", o.model_prediction_type == "sigma_scaled",
                       f"{scheme} weights the loss with --model_prediction_type sigma_scaled only")
    for name in ("logit_mean", "logit_std"):
        _reject_unless(given, base, name, scheme == "logit_normal" and o.timestep_sampling == "sigma",
                       "it needs --weighting_scheme logit_normal with --timestep_sampling sigma")
    _reject_unless(given, base, "mode_scale", scheme == "mode" and o.timestep_sampling == "sigma",
                   "it needs --weighting_scheme mode with --timestep_sampling sigma")
    if o.discrete_flow_shift <= 0:
        raise UserError(f"--discrete_flow_shift must be positive (got {o.discrete_flow_shift})")
    if o.logit_std <= 0:
        raise UserError(f"--logit_std must be positive (got {o.logit_std})")
    _validate_timestep_range(o)
    if o.ip_noise_gamma_random_strength and not o.ip_noise_gamma:
        raise UserError("--ip_noise_gamma_random_strength needs --ip_noise_gamma")
    huber = o.loss_type in ("huber", "smooth_l1")
    for name in ("huber_schedule", "huber_c", "huber_scale"):
        _reject_unless(given, base, name, huber, f"it only affects --loss_type huber or smooth_l1 (got {o.loss_type})")
    if huber and o.huber_c <= 0:
        raise UserError(f"--huber_c must be positive (got {o.huber_c})")


def _validate_timestep_range(o: FlowMatchingOptions) -> None:
    for name in ("min_timestep", "max_timestep"):
        value = getattr(o, name)
        if value is not None and not 0 <= value <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--{name} {value}: flow-matching timesteps are thousandths of sigma, 0 to 1000")
    low, high = o.sigma_range
    if low > high:
        raise UserError(f"--min_timestep {o.min_timestep} is above --max_timestep {o.max_timestep}")


# ---- the formulas -------------------------------------------------------------------------------


def shift_sigmas(t: "torch.Tensor", shift: float) -> "torch.Tensor":
    """SD3/sd-scripts' discrete flow shift: shift * t / (1 + (shift - 1) * t)."""
    return (t * shift) / (1 + (shift - 1) * t)


def flux_shift_mu(image_seq_len: int) -> float:
    """mu of FLUX's time shift, linear in the packed sequence length through FLUX_SHIFT_POINTS."""
    (x1, y1), (x2, y2) = FLUX_SHIFT_POINTS
    slope = (y2 - y1) / (x2 - x1)
    return slope * image_seq_len + (y1 - slope * x1)


def flux_time_shift(t: "torch.Tensor", mu: float) -> "torch.Tensor":
    """exp(mu) / (exp(mu) + (1 / t - 1)), BFL's time_shift with sigma = 1."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def reversed_flux_time_shift(t: "torch.Tensor", mu: float) -> "torch.Tensor":
    """sd-scripts' nextdit_shift: FLUX's time shift applied to 1 - t, sigma = 1 - shift(1 - t)."""
    return 1 - flux_time_shift(1 - t, mu)


def apply_model_prediction_type(kind: str, output, noisy, sigmas, output_sign: float = 1.0):
    """What the loss compares with the target: the output (raw), output + noisy (additive), or the
    x0 estimate noisy - sigma * velocity (sigma_scaled), where velocity = output_sign * output."""
    if kind == "raw":
        return output
    if kind == "additive":
        return output + noisy
    if kind == "sigma_scaled":
        return noisy - _per_sample(sigmas, output) * (output_sign * output)
    raise ValueError(f"unknown model prediction type {kind!r}")


def flow_target(kind: str, latents, noise, output_sign: float = 1.0):
    """The latents for sigma_scaled (an x0 estimate), else the velocity output_sign * (noise - latents)."""
    if kind == "sigma_scaled":
        return latents
    return (noise - latents) if output_sign > 0 else (latents - noise)


def _per_sample(values: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class FlowMatchingNoiseScheme(NoiseScheme):
    """Flow matching in sigma units: t == sigma in [0, 1], 1 is pure noise.

    `model_timestep_scale` converts sigma into what the denoiser takes (FLUX 1.0: diffusers multiplies
    by 1000 inside; SD3 1000); `reverse_model_timesteps` passes 1 - sigma and `output_sign` -1 says
    the denoiser's velocity points from noise to data (Lumina 2).
    """

    def __init__(self, options: FlowMatchingOptions = FlowMatchingOptions(), model_timestep_scale: float = 1.0,
                 reverse_model_timesteps: bool = False, output_sign: float = 1.0,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.options = options
        self.model_timestep_scale = model_timestep_scale
        self.reverse_model_timesteps = reverse_model_timesteps
        self.output_sign = output_sign
        self.num_train_timesteps = num_train_timesteps
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps,
                                                         shift=options.discrete_flow_shift)
        self._last_latent_shape: Optional[tuple] = None

    # ----- noise and timesteps -----------------------------------------------------------------
    def sample_noise(self, latents, generator):
        import torch

        self._last_latent_shape = tuple(latents.shape)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device)
        return noise.to(latents.device, latents.dtype)

    def sample_timesteps(self, batch_size, device, generator, latent_shape: Optional[tuple] = None):
        """Sigmas [B] (float32) within --min/--max_timestep. flux_shift and nextdit_shift need the latents'
        [B, C, H, W] shape: pass it, or call sample_noise(latents) first (the trainer does) and that shape is used."""
        low, high = self.options.sigma_range
        sigmas = self._draw_sigmas(batch_size, generator, latent_shape)
        return (low + sigmas * (high - low)).to(device)

    def _draw_sigmas(self, batch_size, generator, latent_shape: Optional[tuple]):
        import torch

        o = self.options
        if o.timestep_sampling == "sigma":
            return self._table_sigmas(batch_size, generator)
        if o.timestep_sampling == "uniform":
            return torch.rand(batch_size, generator=generator, device=generator.device)
        t = torch.sigmoid(o.sigmoid_scale * torch.randn(batch_size, generator=generator, device=generator.device))
        if o.timestep_sampling == "sigmoid":
            return t
        if o.timestep_sampling == "shift":
            return shift_sigmas(t, o.discrete_flow_shift)
        mu = flux_shift_mu(self._packed_length(latent_shape))
        if o.timestep_sampling == "nextdit_shift":
            return reversed_flux_time_shift(t, mu)
        return flux_time_shift(t, mu)

    def _packed_length(self, latent_shape: Optional[tuple]) -> int:
        shape = latent_shape or self._last_latent_shape
        if shape is None:
            raise ValueError(f"{self.options.timestep_sampling} sampling needs the latent shape: pass latent_shape or call sample_noise first")
        return (shape[-2] // 2) * (shape[-1] // 2)

    def _table_sigmas(self, batch_size: int, generator):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        o = self.options
        u = compute_density_for_timestep_sampling(
            weighting_scheme=o.weighting_scheme, batch_size=batch_size, logit_mean=o.logit_mean,
            logit_std=o.logit_std, mode_scale=o.mode_scale, device=generator.device, generator=generator,
        )
        # sd-scripts indexes with (u * 1000).long(); a sigmoid that rounds to 1.0 would index past the table
        indices = (u.cpu() * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.scheduler.sigmas[indices].float()

    def add_noise(self, latents, noise, t, generator=None):
        import torch

        sigmas = _per_sample(t, latents)
        o = self.options
        if o.ip_noise_gamma:
            if generator is None:
                raise ValueError("ip_noise_gamma is set: pass the batch generator to add_noise")
            strength = o.ip_noise_gamma
            if o.ip_noise_gamma_random_strength:
                strength = torch.rand(1, generator=generator, device=generator.device).item() * o.ip_noise_gamma
            xi = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device, latents.dtype)
            noise = noise + strength * xi  # the target keeps the unperturbed noise
        return (1.0 - sigmas) * latents + sigmas * noise

    def target(self, latents, noise, t):
        return flow_target(self.options.model_prediction_type, latents, noise, self.output_sign)

    def model_timesteps(self, t):
        sigmas = 1.0 - t if self.reverse_model_timesteps else t
        return sigmas * self.model_timestep_scale

    def validation_timesteps(self, count: int, device) -> "torch.Tensor":
        """Evenly spaced sigmas inside --min/--max_timestep (0.2, 0.4, 0.6, 0.8 for four by default)."""
        import torch

        low, high = self.options.sigma_range
        return torch.tensor([low + (i + 1) / (count + 1) * (high - low) for i in range(count)],
                            dtype=torch.float32, device=device)

    def prediction_for_loss(self, output, noisy, t):
        return apply_model_prediction_type(self.options.model_prediction_type, output, noisy, t, self.output_sign)

    def metadata(self) -> dict[str, str]:
        return self.options.metadata()

    # ----- loss weighting ----------------------------------------------------------------------
    def loss_weights(self, t):
        import torch
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.options.model_prediction_type != "sigma_scaled":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)  # as sd-scripts: weights only here
        return compute_loss_weighting_for_sd3(self.options.weighting_scheme, t.float()).float()

    def huber_c(self, t):
        import torch

        o = self.options
        if o.loss_type not in ("huber", "smooth_l1"):
            return None
        if o.huber_schedule == "constant":
            return torch.full(t.shape, o.huber_c * o.huber_scale, device=t.device)
        decay = -math.log(o.huber_c) / self.num_train_timesteps
        return torch.exp(-decay * t.float() * self.num_train_timesteps) * o.huber_scale
