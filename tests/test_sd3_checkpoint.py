"""SD3 pieces alone: SAI single files written by our converter load back exactly (SD3 and SD3.5 layouts) and
read the same in diffusers' own SD3 single-file converter; per-encoder dropout; sd-scripts' SD3 timesteps."""

import random

import pytest
import torch

from library.families.sd3 import SD3NoiseScheme
from library.families.sd3_text import drop_encoder_outputs, mmdit_inputs
from library.models import sd3_checkpoint as ckpt
from library.tiny_models.sd3 import save_tiny_sd3_single_file, tiny_sd3_clip, tiny_sd3_t5, tiny_sd3_transformer, tiny_sd3_vae
from library.training.flow_matching import FlowMatchingOptions


def assert_same(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dual", [False, True])
def test_single_file_round_trip(tmp_path, dual):
    from safetensors.torch import load_file

    paths = save_tiny_sd3_single_file(str(tmp_path), dual_attention=dual)
    models = ckpt.load_sd3_models(paths["checkpoint"], t5_tokenizer=paths["t5_tokenizer"])
    reference = tiny_sd3_transformer(dual)
    assert_same(models.transformer, reference)
    assert {k: v for k, v in models.transformer.config.items() if not k.startswith("_")} == \
        {k: v for k, v in reference.config.items() if not k.startswith("_")}
    assert models.transformer.config.dual_attention_layers == ((0,) if dual else ())
    assert_same(models.vae, tiny_sd3_vae())
    assert (models.vae.config.scaling_factor, models.vae.config.shift_factor) == (1.5305, 0.0609)
    for encoder, expected in zip(models.text_encoders, (tiny_sd3_clip(32, False), tiny_sd3_clip(48, True), tiny_sd3_t5())):
        assert_same(encoder, expected)
    # diffusers' own SAI converter reads our file the same way (a client we did not write)
    state = {k: v for k, v in load_file(paths["checkpoint"]).items() if k.startswith(ckpt.SAI_PREFIX)}
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    ours = reference.state_dict()
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)
    # separate encoder files override the checkpoint's
    other = tiny_sd3_clip(32, False, seed=5)
    ckpt.save_text_encoder_file(other, str(tmp_path / "other_l.safetensors"))
    replaced = ckpt.load_sd3_models(paths["checkpoint"], clip_l=str(tmp_path / "other_l.safetensors"),
                                    t5_tokenizer=paths["t5_tokenizer"])
    assert_same(replaced.text_encoders[0], other)


def test_checkpoint_without_encoders_needs_the_files(tmp_path):
    from library.errors import UserError

    paths = save_tiny_sd3_single_file(str(tmp_path), with_text_encoders=False)
    with pytest.raises(UserError, match="also pass --clip_l, --clip_g, --t5xxl"):
        ckpt.load_sd3_models(paths["checkpoint"], t5_tokenizer=paths["t5_tokenizer"])
    models = ckpt.load_sd3_models(paths["checkpoint"], paths["clip_l"], paths["clip_g"], paths["t5xxl"],
                                  paths["t5_tokenizer"])
    assert_same(models.text_encoders[1], tiny_sd3_clip(48, True))


def conditioning(batch=4):
    torch.manual_seed(0)
    return {"clip_l_hidden": torch.randn(batch, 77, 32), "clip_l_pooled": torch.randn(batch, 32),
            "clip_g_hidden": torch.randn(batch, 77, 48), "clip_g_pooled": torch.randn(batch, 48),
            "t5_hidden": torch.randn(batch, 16, 96)}


def test_per_encoder_dropout_zeroes_whole_encoders_reproducibly():
    cond = conditioning()
    random.seed(3)
    dropped = drop_encoder_outputs(cond, (0.5, 0.0, 1.0))
    random.seed(3)
    again = drop_encoder_outputs(cond, (0.5, 0.0, 1.0))
    assert all(torch.equal(dropped[k], again[k]) for k in cond)
    assert not dropped["t5_hidden"].any()
    assert torch.equal(dropped["clip_g_hidden"], cond["clip_g_hidden"])
    l_kept = [bool(dropped["clip_l_hidden"][i].any()) for i in range(4)]
    assert l_kept == [bool(dropped["clip_l_pooled"][i].any()) for i in range(4)] and 0 < sum(l_kept) < 4
    assert drop_encoder_outputs(cond, (0.0, 0.0, 0.0)) is cond
    context, pooled = mmdit_inputs(cond, "cpu", torch.float32)
    assert context.shape == (4, 77 + 16, 96) and pooled.shape == (4, 80)
    assert torch.equal(context[:, :77, 32:80], cond["clip_g_hidden"]) and not context[:, :77, 80:].any()


def test_sd3_timesteps_follow_sd_scripts():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = SD3NoiseScheme(FlowMatchingOptions(weighting_scheme="logit_normal", model_prediction_type="sigma_scaled"),
                            training_shift=3.0)
    sigmas = scheme.sample_timesteps(64, "cpu", torch.Generator().manual_seed(1))
    u = compute_density_for_timestep_sampling("logit_normal", 64, 0.0, 1.0, generator=torch.Generator().manual_seed(1))
    expected = ((u * 3.0) / (1 + 2.0 * u) * 1000).long().float() / 1000
    assert torch.equal(sigmas, expected)
    assert torch.equal(scheme.model_timesteps(sigmas), sigmas * 1000)
    latents, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    assert torch.equal(scheme.target(latents, noise, sigmas[:2]), latents)
    # --min_timestep/--max_timestep as sd-scripts' SD3: floor(u' * (max - min) + min) / 1000
    ranged = SD3NoiseScheme(FlowMatchingOptions(weighting_scheme="logit_normal", model_prediction_type="sigma_scaled",
                                                min_timestep=100, max_timestep=600), training_shift=3.0)
    expected = ((u * 3.0) / (1 + 2.0 * u) * 500 + 100).long().float() / 1000
    assert torch.equal(ranged.sample_timesteps(64, "cpu", torch.Generator().manual_seed(1)), expected)
