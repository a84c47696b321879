"""Noise scheme: targets, timesteps, noise variants, loss weights and Huber thresholds, exact values."""

import argparse

import pytest
import torch
from diffusers import DDPMScheduler

from library.errors import UserError
from library.training.noise import DDPMNoiseOptions, DDPMNoiseScheme, add_noise_arguments


def sd_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type)


def scheme_from_flags(flags, prediction_type="epsilon"):
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    return DDPMNoiseScheme.from_args(sd_scheduler(prediction_type), parser.parse_args(flags))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def hand_snr(timesteps):
    a = sd_scheduler().alphas_cumprod.double()[timesteps]
    return a / (1 - a)


T = torch.tensor([0, 10, 100, 500, 999])


def test_defaults_are_sd_scripts_values():
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    args = parser.parse_args([])
    assert (args.loss_type, args.huber_schedule, args.huber_c, args.huber_scale) == ("l2", "snr", 0.1, 1.0)
    assert args.multires_noise_discount == 0.3 and args.noise_offset is None and args.min_snr_gamma is None


def test_min_snr_weights_epsilon_and_v_match_hand_formula():
    snr = hand_snr(T)
    eps = scheme_from_flags(["--min_snr_gamma", "5"]).loss_weights(T)
    v = scheme_from_flags(["--min_snr_gamma", "5"], "v_prediction").loss_weights(T)
    assert torch.allclose(eps.double(), torch.minimum(snr, torch.tensor(5.0).double()) / snr, rtol=1e-5)
    assert torch.allclose(v.double(), torch.minimum(snr, torch.tensor(5.0).double()) / (snr + 1), rtol=1e-5)
    assert eps.dtype == torch.float32 and eps.shape == (5,)
    assert eps[0].item() == pytest.approx(5 / snr[0].item(), rel=1e-5)  # snr(0) ~ 1175 > gamma
    assert eps[-1].item() == 1.0  # snr(999) ~ 0.0047 < gamma


def test_snr_scaled_weights_match_sd_scripts_formulas():
    snr = hand_snr(T).clamp(max=1000)
    scale = snr / (snr + 1)
    debiased_eps = scheme_from_flags(["--debiased_estimation_loss"]).loss_weights(T)
    debiased_v = scheme_from_flags(["--debiased_estimation_loss"], "v_prediction").loss_weights(T)
    scaled_v = scheme_from_flags(["--scale_v_pred_loss_like_noise_pred"], "v_prediction").loss_weights(T)
    like_v = scheme_from_flags(["--v_pred_like_loss", "0.5"]).loss_weights(T)
    assert torch.allclose(debiased_eps.double(), 1 / snr.sqrt(), rtol=1e-5)
    assert torch.allclose(debiased_v.double(), 1 / (snr + 1), rtol=1e-5)
    assert torch.allclose(scaled_v.double(), scale, rtol=1e-5)
    loss = torch.tensor([0.3, 0.2, 0.1, 0.4, 0.5]).double()
    assert torch.allclose(loss * like_v.double(), loss + loss / scale * 0.5, rtol=1e-5)  # sd-scripts' additive form


def test_weights_multiply_and_default_to_one():
    both = scheme_from_flags(["--min_snr_gamma", "5", "--debiased_estimation_loss"]).loss_weights(T)
    a = scheme_from_flags(["--min_snr_gamma", "5"]).loss_weights(T)
    b = scheme_from_flags(["--debiased_estimation_loss"]).loss_weights(T)
    assert torch.allclose(both, a * b)
    assert torch.equal(scheme_from_flags([]).loss_weights(T), torch.ones(5))


def test_targets_epsilon_is_noise_and_v_is_get_velocity():
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    t = torch.tensor([3, 700])
    eps_scheme, v_scheme = scheme_from_flags([]), scheme_from_flags([], "v_prediction")
    assert torch.equal(eps_scheme.target(latents, noise, t), noise)
    assert torch.equal(v_scheme.target(latents, noise, t), sd_scheduler().get_velocity(latents, noise, t))
    a = sd_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v_scheme.add_noise(latents, noise, t), a.sqrt() * latents + (1 - a).sqrt() * noise)
    assert torch.equal(v_scheme.model_timesteps(t), t)


def test_zero_terminal_snr_rescales_a_new_scheduler():
    original = sd_scheduler("v_prediction")
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    scheme = DDPMNoiseScheme.from_args(original, parser.parse_args(["--zero_terminal_snr", "--min_snr_gamma", "5"]))
    assert scheme.scheduler.alphas_cumprod[-1].item() == 0.0
    assert original.alphas_cumprod[-1].item() > 0  # the family's scheduler is left alone
    assert scheme.scheduler.alphas_cumprod[0].item() == pytest.approx(original.alphas_cumprod[0].item(), rel=1e-6)
    weights = scheme.loss_weights(torch.tensor([999, 0]))
    assert weights[0].item() == 0.0 and torch.isfinite(weights).all()


def test_zero_terminal_snr_epsilon_min_snr_weight_is_finite():
    scheme = scheme_from_flags(["--zero_terminal_snr", "--min_snr_gamma", "5"])
    assert scheme.loss_weights(torch.tensor([999])).item() == 1.0  # min(0, 5) / 0 taken as its limit 1


def test_same_generator_seed_same_noise_and_global_rng_untouched():
    scheme = scheme_from_flags(["--noise_offset", "0.1", "--multires_noise_iterations", "3",
                                "--noise_offset_random_strength"])
    latents = torch.randn(2, 4, 16, 16, generator=gen(9))
    state = torch.get_rng_state()
    first = scheme.sample_noise(latents, gen(5)), scheme.sample_timesteps(2, "cpu", gen(5))
    second = scheme.sample_noise(latents, gen(5)), scheme.sample_timesteps(2, "cpu", gen(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], scheme.sample_noise(latents, gen(6)))


def test_noise_offset_adds_per_channel_shift_exactly():
    latents = torch.zeros(2, 4, 8, 8)
    noise = scheme_from_flags(["--noise_offset", "0.5"]).sample_noise(latents, gen(3))
    g = gen(3)
    base = torch.randn(2, 4, 8, 8, generator=g)
    shift = torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(noise, base + 0.5 * shift)
    assert torch.allclose((noise - base).mean(dim=(2, 3)), 0.5 * shift.view(2, 4))


def test_adaptive_noise_scale_uses_latent_channel_mean():
    latents = torch.zeros(1, 2, 4, 4)
    latents[0, 0] = -2.0
    latents[0, 1] = 1.0
    noise = scheme_from_flags(["--noise_offset", "0.1", "--adaptive_noise_scale", "0.5"]).sample_noise(latents, gen(4))
    g = gen(4)
    base = torch.randn(1, 2, 4, 4, generator=g)
    shift = torch.randn(1, 2, 1, 1, generator=g)
    strength = torch.tensor([0.1 + 0.5 * 2.0, 0.1 + 0.5 * 1.0]).view(1, 2, 1, 1)
    assert torch.allclose(noise, base + strength * shift)


def test_multires_noise_shape_and_unit_std():
    latents = torch.zeros(2, 4, 32, 32)
    scheme = scheme_from_flags(["--multires_noise_iterations", "6", "--multires_noise_discount", "0.4"])
    noise = scheme.sample_noise(latents, gen(7))
    plain = scheme_from_flags([]).sample_noise(latents, gen(7))
    assert noise.shape == latents.shape and noise.dtype == torch.float32
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(noise, plain)
    assert abs(neighbour_correlation(plain)) < 0.05
    # strong low-frequency levels make neighbouring pixels correlated, unlike white noise
    smooth = scheme_from_flags(["--multires_noise_iterations", "6", "--multires_noise_discount", "0.8"])
    assert neighbour_correlation(smooth.sample_noise(latents, gen(7))) > 0.1


def neighbour_correlation(noise):
    return torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1].item()


def test_ip_noise_gamma_perturbs_input_not_target():
    scheme = scheme_from_flags(["--ip_noise_gamma", "0.1"])
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    t = torch.tensor([10, 900])
    noisy = scheme.add_noise(latents, noise, t, gen(8))
    perturbation = torch.randn(2, 4, 8, 8, generator=gen(8))
    assert torch.allclose(noisy, sd_scheduler().add_noise(latents, noise + 0.1 * perturbation, t))
    assert torch.equal(scheme.target(latents, noise, t), noise)
    with pytest.raises(ValueError, match="generator"):
        scheme.add_noise(latents, noise, t)


def test_timesteps_respect_min_and_max():
    t = scheme_from_flags(["--min_timestep", "100", "--max_timestep", "110"]).sample_timesteps(500, "cpu", gen(0))
    assert t.dtype == torch.long and t.min().item() == 100 and t.max().item() == 109
    fixed = scheme_from_flags(["--min_timestep", "300", "--max_timestep", "300"]).sample_timesteps(3, "cpu", gen(0))
    assert fixed.tolist() == [300, 300, 300]
    full = scheme_from_flags([]).sample_timesteps(4000, "cpu", gen(0))
    assert full.min().item() == 0 and full.max().item() == 999


def test_huber_thresholds_for_each_schedule():
    t = torch.tensor([0, 500, 1000 - 1])
    assert scheme_from_flags([]).huber_c(t) is None
    constant = scheme_from_flags(["--loss_type", "huber", "--huber_schedule", "constant", "--huber_c", "0.2",
                                  "--huber_scale", "2"]).huber_c(t)
    assert torch.allclose(constant, torch.full((3,), 0.4))
    exponential = scheme_from_flags(["--loss_type", "smooth_l1", "--huber_schedule", "exponential",
                                     "--huber_scale", "3"]).huber_c(torch.tensor([0, 500, 1000 - 1]))
    expected = torch.tensor([3.0, 3 * 0.1**0.5, 3 * 0.1**0.999])
    assert torch.allclose(exponential, expected, rtol=1e-5)
    snr_c = scheme_from_flags(["--loss_type", "huber"]).huber_c(t)
    a = sd_scheduler().alphas_cumprod[t].double()
    sigma = ((1 - a) / a).sqrt()
    assert torch.allclose(snr_c.double(), 0.9 / (1 + sigma) ** 2 + 0.1, rtol=1e-5)


@pytest.mark.parametrize("flags, prediction, message", [
    (["--adaptive_noise_scale", "0.1"], "epsilon", "needs --noise_offset"),
    (["--scale_v_pred_loss_like_noise_pred"], "epsilon", "v-prediction"),
    (["--v_pred_like_loss", "0.1"], "v_prediction", "cannot be used"),
    (["--min_timestep", "500", "--max_timestep", "100"], "epsilon", "min_timestep"),
    (["--max_timestep", "1001"], "epsilon", "max_timestep"),
    (["--huber_c", "0.2"], "epsilon", "--huber_c only affects"),
    (["--loss_type", "huber", "--huber_scale", "2"], "epsilon", "huber_scale has no effect"),
    (["--multires_noise_discount", "0.5"], "epsilon", "needs --multires_noise_iterations"),
    (["--zero_terminal_snr", "--debiased_estimation_loss"], "epsilon", "infinite loss weight"),
    (["--min_snr_gamma", "0"], "epsilon", "positive"),
])
def test_bad_flag_combinations_are_user_errors(flags, prediction, message):
    with pytest.raises(UserError, match=message):
        scheme_from_flags(flags, prediction)


def test_unsupported_prediction_type_is_user_error():
    with pytest.raises(UserError, match="sample"):
        DDPMNoiseScheme(sd_scheduler("sample"), DDPMNoiseOptions())
