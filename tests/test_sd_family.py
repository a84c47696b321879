"""The SD family: flags, loading through the family, tokenization/encoding layout, latents, predict, LoRA targets."""


import pytest
import torch

from library.errors import UserError
from library.families import get_family
from library.families.sd import SDFamily
from library.families.sd_text import (
    SDLatentsCachingStrategy,
    SDTextEncodingStrategy,
    SDTokenizeStrategy,
    weight_content_positions,
)
from library.training.modes import NETWORK

BOS, EOS = 49406, 49407


def parse(*argv):
    from library.config.arguments import build_parser

    family = SDFamily()
    args = build_parser(family, "network").parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "out", *argv])
    return family.configure(args, NETWORK), args


@pytest.fixture(scope="module")
def tokenizer():
    from library.models.clip_tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def v2_tokenizer():
    from library.models.clip_tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(pad_token="!")


@pytest.fixture(scope="module")
def text_encoder():
    from library.tiny_models.sd import tiny_clip_text_model

    return tiny_clip_text_model().eval()


def words(n):
    return " ".join(["cat"] * n)  # "cat" is one token


# ---- flags ---------------------------------------------------------------------------------------

def test_get_family_returns_a_fresh_sd_family():
    assert isinstance(get_family("sd"), SDFamily)
    assert get_family("sd") is not get_family("sd")
    with pytest.raises(UserError, match="did you mean `sd`"):
        get_family("sdd")


@pytest.mark.parametrize("argv, message", [
    (["--max_token_length", "100"], "--max_token_length 100: use 75, 150 or 225"),
    (["--clip_skip", "0"], "--clip_skip 0"),
])
def test_settings_reject_bad_values(argv, message):
    with pytest.raises(UserError, match=message):
        parse(*argv)


def test_variant_names_follow_the_flags():
    family, _ = parse()
    assert (family.base_model_version, family.modelspec_architecture(None)) == ("sd_v1", "stable-diffusion-v1")
    family, _ = parse("--v2", "--v_parameterization")
    assert (family.base_model_version, family.modelspec_architecture(None)) == ("sd_v2_v", "stable-diffusion-v2-768-v")
    family, _ = parse("--v2")
    assert family.modelspec_architecture(None) == "stable-diffusion-v2-512"


# ---- loading through the family ------------------------------------------------------------------

@pytest.fixture(scope="module")
def components(tiny_sd15_folder):
    family, args = parse("--v_parameterization")
    args.pretrained_model_name_or_path = tiny_sd15_folder
    return family.load(args)


def test_load_from_diffusers_folder(components, tiny_sd15_folder):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(components.denoiser, UNet2DConditionModel)
    assert isinstance(components.vae, AutoencoderKL)
    assert isinstance(components.text_encoders[0], CLIPTextModel)
    assert components.tokenizers[0]("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    scheduler = components.noise_scheduler
    assert isinstance(scheduler, DDPMScheduler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.num_train_timesteps == 1000
    expected_betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    assert torch.equal(scheduler.betas, expected_betas)
    assert components.source == tiny_sd15_folder


def test_v2_flag_must_match_the_model(tiny_sd15_folder):
    family, args = parse("--v2")
    args.pretrained_model_name_or_path = tiny_sd15_folder
    with pytest.raises(UserError, match="SD 1.x model .*; remove --v2"):
        family.load(args)


def test_clip_skip_beyond_the_text_encoder_is_rejected(tiny_sd15_folder):
    family, args = parse("--clip_skip", "3")
    args.pretrained_model_name_or_path = tiny_sd15_folder
    with pytest.raises(UserError, match="--clip_skip 3: the text encoder has only 2 layers"):
        family.load(args)


def test_predict_returns_the_latent_shape(components):
    family, args = parse()
    latents = torch.randn(2, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(2, 152, 32)}
    with torch.no_grad():
        out = family.predict(components, latents, torch.tensor([10, 900]), cond, batch={})
    assert out.shape == (2, 4, 8, 8)


def test_noise_scheme_uses_the_components_scheduler(components):
    family, args = parse("--v_parameterization")
    scheme = family.noise_scheme(args, components)
    assert scheme.v_prediction and scheme.num_train_timesteps == 1000


def test_lora_targets_and_kohya_names(components):
    family, _ = parse()
    unet_target, te_target = family.lora_targets(components)
    assert (unet_target.prefix, unet_target.root) == ("lora_unet", components.denoiser)
    assert unet_target.container_classes == ("Transformer2DModel",)
    assert unet_target.conv3x3_container_classes == ("ResnetBlock2D", "Downsample2D", "Upsample2D")
    assert te_target.is_text_encoder and te_target.root is components.text_encoders[0]
    assert te_target.container_classes == ("CLIPAttention", "CLIPMLP")
    unet_classes = {type(m).__name__ for m in components.denoiser.modules()}
    te_classes = {type(m).__name__ for m in components.text_encoders[0].modules()}
    assert set(unet_target.container_classes + unet_target.conv3x3_container_classes) <= unet_classes
    assert set(te_target.container_classes) <= te_classes
    te_name = te_target.file_name("encoder.layers.0.self_attn.q_proj")
    assert te_name == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert unet_target.file_name(path) == "lora_unet_" + path.replace(".", "_")


def test_build_pipeline_samples_an_image(components):
    pipeline = SDFamily().build_pipeline(components)
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    image = pipeline("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                     guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


# ---- tokenization --------------------------------------------------------------------------------

@pytest.mark.parametrize("max_token_length, chunks", [(75, 1), (150, 2), (225, 3)])
def test_tokenize_shapes(tokenizer, max_token_length, chunks):
    tokens = SDTokenizeStrategy(tokenizer, max_token_length).tokenize(["a cat", words(100)])
    assert list(tokens[0]) == ["input_ids"]
    assert tokens[0]["input_ids"].shape == (2, chunks, 77)


def test_v1_chunks_wrap_every_75_tokens_with_bos_and_eos(tokenizer):
    ids = SDTokenizeStrategy(tokenizer, 150).tokenize([words(100)])[0]["input_ids"][0]
    cat = tokenizer("cat").input_ids[1]
    assert ids[0].tolist() == [BOS] + [cat] * 75 + [EOS]
    assert ids[1].tolist() == [BOS] + [cat] * 25 + [EOS] * 51


def test_v2_chunks_end_with_eos_and_empty_chunks_start_with_eos(v2_tokenizer):
    ids = SDTokenizeStrategy(v2_tokenizer, 225).tokenize([words(75)])[0]["input_ids"][0]
    cat = v2_tokenizer("cat").input_ids[1]
    assert ids[0].tolist() == [BOS] + [cat] * 75 + [EOS]  # full chunk: last padding becomes EOS
    assert ids[1].tolist() == [BOS, EOS] + [0] * 75  # the caption's own EOS opens the chunk
    assert ids[2].tolist() == [BOS, EOS] + [0] * 75  # empty chunk: first padding becomes EOS
    short = SDTokenizeStrategy(v2_tokenizer, 150).tokenize(["cat"])[0]["input_ids"][0]
    assert short[0].tolist() == [BOS, cat, EOS] + [0] * 74


def test_weighted_tokenize_adds_chunked_weights(tokenizer):
    strategy = SDTokenizeStrategy(tokenizer, 150, weighted=True)
    tokens = strategy.tokenize([words(74) + " (dog:1.5) dog"])[0]
    dog = tokenizer("dog").input_ids[1]
    assert tokens["input_ids"][0, 0, 75].item() == dog and tokens["input_ids"][0, 1, 1].item() == dog
    assert tokens["weights"].shape == (1, 2, 77)
    expected = torch.ones(2, 77)
    expected[0, 75] = 1.5
    assert torch.equal(tokens["weights"][0], expected)


# ---- encoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_token_length, length", [(75, 77), (150, 152), (225, 227)])
def test_hidden_state_length(tokenizer, text_encoder, max_token_length, length):
    tokens = SDTokenizeStrategy(tokenizer, max_token_length).tokenize(["a cat", "a dog"])
    with torch.no_grad():
        states = SDTextEncodingStrategy().encode([text_encoder], tokens)["encoder_hidden_states"]
    assert states.shape == (2, length, 32)


def test_chunks_are_encoded_separately_and_joined(tokenizer, text_encoder):
    tokens = SDTokenizeStrategy(tokenizer, 150).tokenize([words(100)])
    ids = tokens[0]["input_ids"][0]
    with torch.no_grad():
        joined = SDTextEncodingStrategy().encode([text_encoder], tokens)["encoder_hidden_states"][0]
        first, second = text_encoder(ids).last_hidden_state
    assert torch.equal(joined[0], first[0])
    assert torch.equal(joined[1:76], first[1:76])
    assert torch.equal(joined[76:151], second[1:76])
    assert torch.equal(joined[151], second[76])


def test_clip_skip_2_is_the_penultimate_layer_after_the_final_norm(tokenizer, text_encoder):
    tokens = SDTokenizeStrategy(tokenizer, 75).tokenize(["a photo of a cat"])
    ids = tokens[0]["input_ids"][:, 0]
    with torch.no_grad():
        states = SDTextEncodingStrategy(clip_skip=2).encode([text_encoder], tokens)["encoder_hidden_states"]
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states
        expected = text_encoder.final_layer_norm(hidden[-2])
        last = SDTextEncodingStrategy(clip_skip=1).encode([text_encoder], tokens)["encoder_hidden_states"]
    assert torch.equal(states, expected)
    assert torch.equal(last, text_encoder(ids).last_hidden_state)
    assert not torch.allclose(states, last)


def test_caption_weights_multiply_positions_as_sd_scripts_training(tokenizer, text_encoder):
    """sd-scripts' training path (and our SDXL): each content state times its weight, no mean restoration."""
    caption = "a (cat:1.5) on a [mat]"
    weighted = SDTokenizeStrategy(tokenizer, 75, weighted=True).tokenize([caption])
    plain = SDTokenizeStrategy(tokenizer, 75).tokenize(["a cat on a mat"])
    assert torch.equal(weighted[0]["input_ids"], plain[0]["input_ids"])
    encoder = SDTextEncodingStrategy()
    with torch.no_grad():
        base = encoder.encode([text_encoder], plain)["encoder_hidden_states"]
        out = encoder.encode([text_encoder], weighted)["encoder_hidden_states"]
    weights = weighted[0]["weights"][0, 0]
    torch.testing.assert_close(out, base * weights[None, :, None], rtol=0, atol=1e-6)
    assert torch.equal(out[:, 2], base[:, 2] * 1.5) and torch.equal(out[:, 1], base[:, 1])  # only "cat" scaled
    assert weights[2].item() == 1.5 and weights[5].item() == pytest.approx(1 / 1.1)


def test_unit_weights_change_nothing():
    states = torch.randn(2, 152, 8)
    assert torch.equal(weight_content_positions(states, torch.ones(2, 2, 77)), states)


# ---- latents and cache identities ----------------------------------------------------------------

def test_latents_use_the_vae_scaling_factor(components):
    strategy = SDLatentsCachingStrategy()
    vae = components.vae
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = strategy.encode(vae, images, generator=torch.Generator().manual_seed(3))
        expected = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(3)) * 0.18215
        decoded = strategy.decode(vae, latents)
        expected_image = vae.decode(latents / 0.18215).sample
    assert torch.equal(latents, expected) and latents.shape == (1, 4, 8, 8)
    assert torch.equal(decoded, expected_image)
    assert strategy.cache_identity() == {"family": "sd", "latent_channels": "4", "vae": ""}


def test_text_encoder_cache_identity():
    family, args = parse("--max_token_length", "225", "--clip_skip", "2", "--weighted_captions")
    assert family.text_encoder_outputs_caching_strategy(args, None).cache_identity() == {
        "family": "sd", "text_encoder": "clip-l", "model": "x", "max_token_length": "225",
        "clip_skip": "2", "weighted_captions": "multiply",
    }
