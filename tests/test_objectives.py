"""Every family's training objective, proven through the trainer's own per-step loss path.

A denoiser that returns the analytically right output for the noise, latents and timesteps the step
draws must score a loss of zero (below 1e-6), and any perturbation of it a strictly larger loss. This
runs `StepLoss.sample_losses` of each real family (its parser, settings_from_args, noise scheme and
prediction conversion), with only `predict` replaced, for every prediction type and timestep sampling,
and epsilon / v-prediction for SD and SDXL. The right outputs are written here from the definitions:
the flow velocity is noise - latents (Lumina 2's own convention: latents - noise); additive predicts
velocity - noisy input; DDPM predicts the noise or v = sqrt(a) * noise - sqrt(1 - a) * latents.
"""

from argparse import Namespace
from contextlib import nullcontext

import pytest
import torch

from library.config.arguments import parse_training_args
from library.families import get_family
from library.training.distributed import noised_inputs
from library.training.flow_matching import MODEL_PREDICTION_TYPES, TIMESTEP_SAMPLINGS
from library.training.step_loss import StepLoss

SEEDS = (11, 12, 13, 14)
TOKENIZERS = {"sd": 1, "sdxl": 2, "flux": 2, "sd3": 3, "lumina": 1}  # the tokenizers are not called: text is cached
LATENT_SHAPE = (len(SEEDS), 16, 8, 8)


class OneProcess:
    device = torch.device("cpu")

    def autocast(self):
        return nullcontext()


def with_answer(family):
    """The real family, with predict() returning the output the test put in `family.answer`."""

    class Perfect(type(family)):
        def predict(self, components, noisy_latents, timesteps, conditioning, batch):
            return self.answer

    family.__class__ = Perfect
    return family


def build_step_loss(name: str, argv: list[str], v_prediction: bool = False):
    from library.models.sd_checkpoint import sd_noise_scheduler

    family, args = parse_training_args(get_family(name), "network",
                                       ["--pretrained_model_name_or_path", "x", "--output_dir", "out", *argv])
    components = Namespace(tokenizers=[None] * TOKENIZERS[name], noise_scheduler=sd_noise_scheduler(v_prediction),
                           is_schnell=False)
    return StepLoss(with_answer(family), components, args, OneProcess(), None, torch.float32, trains_text_encoder=False)


def draw(step_loss):
    """The latents, the batch, and the noise and timesteps sample_losses will draw from its generators."""
    latents = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    batch = {"latents": latents, "conditioning": {}, "loss_weights": torch.ones(len(SEEDS))}
    noisy, noise, t = noised_inputs(step_loss.noise, latents, generators())
    return batch, latents, noisy, noise, t


def generators():
    return [torch.Generator().manual_seed(seed) for seed in SEEDS]


def per_sample(values, like):
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def flow_answer(kind: str, latents, noise, noisy, sign: float):
    velocity = sign * (noise - latents)
    return velocity - noisy if kind == "additive" else velocity  # raw and sigma_scaled: the velocity


def ddpm_answer(step_loss, latents, noise, t):
    if not step_loss.noise.v_prediction:
        return noise
    alphas = per_sample(step_loss.noise.scheduler.alphas_cumprod[t], latents)
    return alphas.sqrt() * noise - (1 - alphas).sqrt() * latents


def assert_perfect_and_perturbed(step_loss, batch, answer):
    step_loss.family.answer = answer
    perfect = step_loss.sample_losses(batch, generators())
    assert perfect.max().item() < 1e-6, perfect
    step_loss.family.answer = answer + 0.05 * torch.randn(answer.shape, generator=torch.Generator().manual_seed(5))
    perturbed = step_loss.sample_losses(batch, generators())
    assert (perturbed > perfect).all(), (perfect, perturbed)


FLOW_SAMPLING_ARGS = {"sigma": [], "uniform": [], "sigmoid": ["--sigmoid_scale", "1.5"], "shift": [],
                      "flux_shift": [], "nextdit_shift": []}


@pytest.mark.parametrize("name,sign", [("flux", 1.0), ("lumina", -1.0)])
@pytest.mark.parametrize("kind", MODEL_PREDICTION_TYPES)
@pytest.mark.parametrize("sampling", TIMESTEP_SAMPLINGS)
def test_flux_and_lumina_perfect_denoiser(name, sign, kind, sampling):
    argv = ["--model_prediction_type", kind, "--timestep_sampling", sampling, *FLOW_SAMPLING_ARGS[sampling]]
    step_loss = build_step_loss(name, argv)
    batch, latents, noisy, noise, t = draw(step_loss)
    assert_perfect_and_perturbed(step_loss, batch, flow_answer(kind, latents, noise, noisy, sign))


@pytest.mark.parametrize("name,sign", [("flux", 1.0), ("lumina", -1.0)])
def test_defaults_train_the_velocity(name, sign):
    """With no objective flags, the exact velocity scores zero (it scored about 5 before: issue 10)."""
    step_loss = build_step_loss(name, [])
    assert step_loss.noise.options.model_prediction_type == "raw"
    batch, latents, noisy, noise, t = draw(step_loss)
    assert_perfect_and_perturbed(step_loss, batch, sign * (noise - latents))


@pytest.mark.parametrize("weighting", ["uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("extra", [[], ["--training_shift", "3.0", "--min_timestep", "100", "--max_timestep", "900"]])
def test_sd3_perfect_denoiser(weighting, extra):
    """SD3's output is preconditioned into an x0 estimate: the velocity noise - latents is exact."""
    step_loss = build_step_loss("sd3", ["--weighting_scheme", weighting, *extra])
    batch, latents, noisy, noise, t = draw(step_loss)
    assert_perfect_and_perturbed(step_loss, batch, noise - latents)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
@pytest.mark.parametrize("v_prediction", [False, True])
@pytest.mark.parametrize("argv", [[], ["--min_timestep", "200", "--max_timestep", "800"]])
def test_ddpm_perfect_denoiser(name, v_prediction, argv):
    flags = ["--v_parameterization"] if v_prediction else []
    step_loss = build_step_loss(name, [*flags, *argv], v_prediction=v_prediction)
    assert step_loss.noise.v_prediction == v_prediction
    batch, latents, noisy, noise, t = draw(step_loss)
    assert_perfect_and_perturbed(step_loss, batch, ddpm_answer(step_loss, latents, noise, t))


def test_flux_sigma_scaled_trains_against_the_latents():
    """sd-scripts compares FLUX's x0 estimate with noise - latents, so its exact velocity scored about 5;
    here sigma_scaled's target is the latents (as SD3 and diffusers' preconditioning)."""
    step_loss = build_step_loss("flux", ["--model_prediction_type", "sigma_scaled"])
    batch, latents, noisy, noise, t = draw(step_loss)
    prediction = step_loss.noise.prediction_for_loss(noise - latents, noisy, t)
    torch.testing.assert_close(prediction, latents, rtol=0, atol=1e-5)
    sd_scripts_loss = ((prediction - (noise - latents)) ** 2).mean().item()
    assert sd_scripts_loss > 1.0  # what the inconsistent target charged a perfect model
