"""Flow matching against the published formulas (sd-scripts' flux_train_utils, SD3 paper weightings) on
fixed generator draws, and the flag rules (ineffective flags and DDPM-only flags are errors)."""

import argparse
import math

import pytest
import torch

from library.errors import UserError
from library.training.flow_matching import (
    FLUX_OBJECTIVE,
    LUMINA_OBJECTIVE,
    FlowMatchingNoiseScheme,
    FlowMatchingOptions,
    add_flow_matching_arguments,
    apply_model_prediction_type,
    flux_shift_mu,
    reject_ddpm_flags,
)

B = 6


def scheme(**options):
    return FlowMatchingNoiseScheme(FlowMatchingOptions(**options))


def draws(seed=3, kind="randn", n=B):
    generator = torch.Generator().manual_seed(seed)
    return getattr(torch, kind)(n, generator=generator)


def sample(noise_scheme, seed=3, latent_shape=(B, 16, 64, 64)):
    return noise_scheme.sample_timesteps(B, "cpu", torch.Generator().manual_seed(seed), latent_shape=latent_shape)


def test_uniform_and_sigmoid_sampling():
    assert torch.equal(sample(scheme(timestep_sampling="uniform")), draws(kind="rand"))
    expected = torch.sigmoid(2.0 * draws())
    assert torch.equal(sample(scheme(timestep_sampling="sigmoid", sigmoid_scale=2.0)), expected)


def test_shift_sampling_is_sd3_shift_of_a_sigmoid():
    t = torch.sigmoid(1.5 * draws())
    expected = 3.1582 * t / (1 + 2.1582 * t)
    got = sample(scheme(timestep_sampling="shift", discrete_flow_shift=3.1582, sigmoid_scale=1.5))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    # shift 1 leaves the sigmoid unchanged; larger shifts move every sigma toward 1 (more noise)
    assert torch.equal(sample(scheme(timestep_sampling="shift", discrete_flow_shift=1.0)), torch.sigmoid(draws()))
    assert (got >= t).all()


def test_flux_shift_uses_the_resolution():
    # BFL's linear mu: 0.5 at 256 packed tokens (256x256 px), 1.15 at 4096 (1024x1024 px)
    assert flux_shift_mu(256) == pytest.approx(0.5) and flux_shift_mu(4096) == pytest.approx(1.15)
    assert flux_shift_mu(1024) == pytest.approx(0.63)
    t = torch.sigmoid(draws())
    expected = math.exp(0.63) / (math.exp(0.63) + 1 / t - 1)  # 64x64 latents = 1024 packed tokens
    got = sample(scheme(timestep_sampling="flux_shift"), latent_shape=(B, 16, 64, 64))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # without an explicit shape, the shape of the last sample_noise call is used (the trainer's order)
    noise_scheme = scheme(timestep_sampling="flux_shift")
    noise_scheme.sample_noise(torch.zeros(B, 16, 64, 64), torch.Generator().manual_seed(0))
    assert torch.equal(noise_scheme.sample_timesteps(B, "cpu", torch.Generator().manual_seed(3)), got)


def shifted_table_sigma(index, shift):
    s = (1000 - index) / 1000  # FlowMatchEulerDiscreteScheduler's table runs from sigma 1 down to 1/1000
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("weighting,u", [
    ("uniform", lambda: draws(kind="rand")),
    ("logit_normal", lambda: torch.sigmoid(0.5 + 0.8 * draws())),
    ("mode", lambda: (lambda u: 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))(draws(kind="rand"))),
])
def test_sigma_sampling_indexes_the_shifted_scheduler_table(weighting, u):
    options = {"logit_mean": 0.5, "logit_std": 0.8} if weighting == "logit_normal" else {}
    got = sample(scheme(timestep_sampling="sigma", weighting_scheme=weighting, discrete_flow_shift=3.0, **options))
    indices = (u() * 1000).long()
    expected = torch.tensor([shifted_table_sigma(i.item(), 3.0) for i in indices])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_noisy_input_target_and_model_timesteps():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.25, 0.9])
    s = scheme()
    noisy = s.add_noise(latents, noise, t)
    assert torch.equal(noisy[0], 0.75 * latents[0] + 0.25 * noise[0])
    assert torch.equal(s.target(latents, noise, t), noise - latents)
    assert torch.equal(s.model_timesteps(t), t)  # FLUX: diffusers multiplies by 1000 inside
    lumina = FlowMatchingNoiseScheme(reverse_model_timesteps=True, output_sign=-1.0)
    assert torch.equal(lumina.model_timesteps(t), 1 - t)
    assert torch.equal(lumina.target(latents, noise, t), latents - noise)  # Lumina's velocity, as sd-scripts
    output = torch.randn(2, 4, 8, 8)
    assert torch.equal(lumina.prediction_for_loss(output, noisy, t), output)
    scaled = FlowMatchingNoiseScheme(FlowMatchingOptions(model_prediction_type="sigma_scaled"), output_sign=-1.0)
    torch.testing.assert_close(scaled.prediction_for_loss(output, noisy, t), noisy + t.view(2, 1, 1, 1) * output,
                               rtol=0, atol=1e-6)
    assert torch.equal(scaled.target(latents, noise, t), latents)
    assert torch.equal(FlowMatchingNoiseScheme(model_timestep_scale=1000.0).model_timesteps(t), t * 1000)


def test_input_perturbation_changes_the_input_not_the_target():
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    s = scheme(ip_noise_gamma=0.1)
    noisy = s.add_noise(latents, noise, t, torch.Generator().manual_seed(1))
    xi = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy, 0.5 * latents + 0.5 * (noise + 0.1 * xi), rtol=0, atol=1e-6)


def test_model_prediction_types():
    prediction, noisy, sigmas = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.7])
    assert torch.equal(apply_model_prediction_type("raw", prediction, noisy, sigmas), prediction)
    assert torch.equal(apply_model_prediction_type("additive", prediction, noisy, sigmas), prediction + noisy)
    scaled = apply_model_prediction_type("sigma_scaled", prediction, noisy, sigmas)
    assert torch.equal(scaled[1], noisy[1] - 0.7 * prediction[1])
    assert torch.equal(scheme(model_prediction_type="sigma_scaled").target(noisy, prediction, sigmas), noisy)


def test_loss_weights_only_with_sigma_scaled():
    t = torch.tensor([0.2, 0.5, 0.8])
    assert torch.equal(scheme(model_prediction_type="raw").loss_weights(t), torch.ones(3))
    scaled = {"model_prediction_type": "sigma_scaled"}
    torch.testing.assert_close(scheme(weighting_scheme="sigma_sqrt", **scaled).loss_weights(t), t ** -2.0)
    cosmap = 2 / (math.pi * (1 - 2 * t + 2 * t ** 2))
    torch.testing.assert_close(scheme(weighting_scheme="cosmap", **scaled).loss_weights(t), cosmap)
    assert torch.equal(scheme(weighting_scheme="logit_normal", **scaled).loss_weights(t), torch.ones(3))


def test_huber_thresholds():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert scheme().huber_c(t) is None
    assert torch.equal(scheme(loss_type="huber", huber_c=0.2, huber_scale=2.0).huber_c(t), torch.full((3,), 0.4))
    exponential = scheme(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.1).huber_c(t)
    torch.testing.assert_close(exponential, torch.tensor([1.0, 0.1 ** 0.5, 0.1]))  # exp(-alpha * sigma * 1000)


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_flow_matching_arguments(parser, FLUX_OBJECTIVE)
    return parser.parse_args(list(argv))


def options(*argv, defaults=FLUX_OBJECTIVE):
    return FlowMatchingOptions.from_args(parse(*argv), defaults)


def test_family_defaults_and_explicit_defaults_are_accepted():
    assert options() == FlowMatchingOptions(
        timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0, weighting_scheme="uniform",
        logit_mean=0.0, logit_std=1.0, mode_scale=1.29, model_prediction_type="raw")
    lumina = options(defaults=LUMINA_OBJECTIVE)
    assert (lumina.timestep_sampling, lumina.discrete_flow_shift, lumina.model_prediction_type) == ("shift", 6.0, "raw")
    options("--timestep_sampling", "uniform", "--sigmoid_scale", "1.0", "--logit_mean", "0")
    # the family's default shift is no error where shift has no effect; another value is
    options("--timestep_sampling", "uniform", "--discrete_flow_shift", "6", defaults=LUMINA_OBJECTIVE)
    with pytest.raises(UserError, match="--discrete_flow_shift 3.0 has no effect"):
        options("--timestep_sampling", "uniform", "--discrete_flow_shift", "3", defaults=LUMINA_OBJECTIVE)


def test_timestep_range_squeezes_every_sampling():
    """sd-scripts' SD3 rule, u * (max - min) + min in thousandths, for every flow-matching sampling."""
    for sampling in ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift"):
        free = sample(scheme(timestep_sampling=sampling))
        squeezed = sample(scheme(timestep_sampling=sampling, min_timestep=200, max_timestep=700))
        torch.testing.assert_close(squeezed, 0.2 + 0.5 * free, rtol=0, atol=1e-6)
    assert options("--min_timestep", "100", "--max_timestep", "900").sigma_range == (0.1, 0.9)
    with pytest.raises(UserError, match="--min_timestep 800 is above --max_timestep 300"):
        options("--min_timestep", "800", "--max_timestep", "300")
    with pytest.raises(UserError, match="--max_timestep 1200: flow-matching timesteps are thousandths"):
        options("--max_timestep", "1200")


def test_nextdit_shift_is_the_flux_shift_in_reversed_time():
    """sd-scripts' lumina_train_util time_shift: t -> 1 - e^mu / (e^mu + 1 / (1 - t) - 1)."""
    t = torch.sigmoid(draws())
    expected = 1 - math.exp(0.63) / (math.exp(0.63) + 1 / (1 - t) - 1)
    got = sample(scheme(timestep_sampling="nextdit_shift"), latent_shape=(B, 16, 64, 64))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got <= t + 1e-7).all()  # reversed: the shift moves sigma toward the clean end


@pytest.mark.parametrize("argv,message", [
    (("--timestep_sampling", "uniform", "--sigmoid_scale", "2"), "--sigmoid_scale 2.0 has no effect"),
    (("--timestep_sampling", "sigmoid", "--discrete_flow_shift", "3.1582"), "--discrete_flow_shift 3.1582 has no effect"),
    (("--timestep_sampling", "shift", "--weighting_scheme", "logit_normal"), "logit_normal shapes the timestep density"),
    (("--weighting_scheme", "cosmap"), "cosmap weights the loss"),
    (("--logit_std", "2"), "--logit_std 2.0 has no effect"),
    (("--weighting_scheme", "logit_normal", "--mode_scale", "1.0"), "needs --weighting_scheme mode"),
    (("--huber_c", "0.2",), "only affects --loss_type huber"),
    (("--ip_noise_gamma_random_strength",), "needs --ip_noise_gamma"),
])
def test_ineffective_or_contradictory_flags_are_rejected(argv, message):
    with pytest.raises(UserError, match=message):
        options(*argv)


@pytest.mark.parametrize("flag", ["--min_snr_gamma 5", "--v_parameterization", "--noise_offset 0.1",
                                  "--debiased_estimation_loss", "--zero_terminal_snr", "--multires_noise_iterations 6"])
def test_ddpm_flags_are_rejected_by_name(flag):
    args = parse(*flag.split())
    with pytest.raises(UserError, match=f"{flag.split()[0]} belongs to DDPM training"):
        reject_ddpm_flags(args, "FLUX.1")
    parser = argparse.ArgumentParser()
    add_flow_matching_arguments(parser, FLUX_OBJECTIVE)
    assert flag.split()[0] not in parser.format_help()  # accepted (sd-scripts configs), but hidden
    reject_ddpm_flags(parse(), "FLUX.1")  # not given: fine
