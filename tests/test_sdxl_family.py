"""The SDXL family: flags, text conditioning against diffusers' own encode_prompt, size conditioning,
SGM layout and configs, LoRA names, text-encoder cache identity, per-encoder learning rates."""

import argparse
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from library.config.dataset_spec import DatasetGroupSpec, DatasetSpec, SubsetSpec
from library.data.dataset import SampleRef, TrainDataset
from library.errors import UserError
from library.families import get_family
from library.families.base import ModelComponents
from library.families.sdxl import SDXLFamily, size_time_ids
from library.families.sdxl_text import SDXLTextEncodingStrategy, SDXLTokenizeStrategy, text_encoders_fingerprint
from library.models import sgm_layout as sgm
from library.models.sdxl_checkpoint import load_sdxl_models
from library.training.modes import FULL, NETWORK, FullFineTuneMode


def parse(*argv, full=False):
    from library.config.arguments import build_parser

    family = SDXLFamily()
    args = build_parser(family, "full" if full else "network").parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "out", *argv])
    return family.configure(args, FULL if full else NETWORK), args


@pytest.fixture(scope="module")
def pipe():
    from library.tiny_models.sdxl import tiny_sdxl_pipeline

    pipeline = tiny_sdxl_pipeline()
    for part in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.unet):
        part.eval()
    return pipeline


def components_of(pipe):
    return ModelComponents(denoiser=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
                           tokenizers=[pipe.tokenizer, pipe.tokenizer_2], noise_scheduler=None)


def encode(pipe, captions, max_token_length=75, weighted=False):
    tokens = SDXLTokenizeStrategy(pipe.tokenizer, pipe.tokenizer_2, max_token_length, weighted).tokenize(captions)
    with torch.no_grad():
        return tokens, SDXLTextEncodingStrategy().encode([pipe.text_encoder, pipe.text_encoder_2], tokens)


# ---- flags ---------------------------------------------------------------------------------------

def test_family_attributes():
    family = get_family("sdxl")
    assert isinstance(family, SDXLFamily)
    assert (family.name, family.display_name, family.base_model_version, family.modelspec_architecture(None)) == (
        "sdxl", "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base")


@pytest.mark.parametrize("argv, message", [
    (["--v2"], "--v2 is for Stable Diffusion 2.x"),
    (["--clip_skip", "2"], "--clip_skip has no effect on SDXL"),
    (["--max_token_length", "100"], "use 75, 150 or 225"),
    (["--learning_rate_te1", "1e-5"], "--learning_rate_te1 is for sdxl_train.py"),
])
def test_ineffective_flags_are_refused(argv, message):
    with pytest.raises(UserError, match=message):
        parse(*argv)


def test_text_encoder_learning_rates_need_train_text_encoder():
    with pytest.raises(UserError, match="--learning_rate_te2 has no effect without --train_text_encoder"):
        parse("--learning_rate_te2", "1e-5", full=True)
    _, args = parse("--learning_rate_te1", "0", "--train_text_encoder", full=True)
    assert args.learning_rate_te1 == 0


def test_full_finetune_learning_rate_per_text_encoder(pipe):
    _, args = parse("--train_text_encoder", "--learning_rate_te1", "0", "--learning_rate_te", "3e-5", full=True)
    args.learning_rate = 1e-4
    mode = FullFineTuneMode(SDXLFamily(), args)
    groups = mode.prepare(components_of(pipe))
    assert [group["lr"] for group in groups] == [1e-4, 3e-5]  # UNet, bigG; CLIP-L (lr 0) stays frozen
    assert mode.trainable_modules(components_of(pipe)) == [pipe.unet, pipe.text_encoder_2]
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    args.learning_rate_te2 = 0
    with pytest.raises(UserError, match="every text-encoder learning rate 0"):
        FullFineTuneMode(SDXLFamily(), args).prepare(components_of(pipe))
    for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)


# ---- text conditioning -------------------------------------------------------------------------------

def test_conditioning_equals_diffusers_encode_prompt(pipe):
    captions = ["a red circle", "a photo of a cat on a sofa, flat drawing"]
    tokens, conditioning = encode(pipe, captions)
    assert tokens[0]["input_ids"].shape == tokens[1]["input_ids"].shape == (2, 1, 77)
    assert tokens[0]["input_ids"][0, 0, 5].item() == 49407 and tokens[1]["input_ids"][0, 0, 5].item() == 0  # "!" pad
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert conditioning["encoder_hidden_states"].shape == (2, 77, 32 + 64)
    assert conditioning["text_embeds"].shape == (2, 64)
    torch.testing.assert_close(conditioning["encoder_hidden_states"], embeds, atol=0, rtol=0)
    torch.testing.assert_close(conditioning["text_embeds"], pooled, atol=0, rtol=0)


def test_long_captions_join_chunks_and_pool_the_first_chunk(pipe):
    caption = " ".join(["cat"] * 100)  # "cat" is one token: 75 in the first chunk, 25 in the second
    tokens, conditioning = encode(pipe, [caption], max_token_length=150)
    assert tokens[1]["input_ids"].shape == (1, 2, 77)
    assert conditioning["encoder_hidden_states"].shape == (1, 152, 96)
    first_chunk = [{"input_ids": tokens[0]["input_ids"][:, :1]}, {"input_ids": tokens[1]["input_ids"][:, :1]}]
    with torch.no_grad():
        first = SDXLTextEncodingStrategy().encode([pipe.text_encoder, pipe.text_encoder_2], first_chunk)
    torch.testing.assert_close(conditioning["text_embeds"], first["text_embeds"])  # batch 2 vs 1: rounding only
    torch.testing.assert_close(conditioning["encoder_hidden_states"][:, :76], first["encoder_hidden_states"][:, :76])


def test_weighted_captions_scale_content_positions_of_both_encoders(pipe):
    _, plain = encode(pipe, ["a cat"], weighted=True)
    _, weighted = encode(pipe, ["a (cat:1.5)"], weighted=True)
    ratio = weighted["encoder_hidden_states"] / plain["encoder_hidden_states"]
    torch.testing.assert_close(ratio[0, 2], torch.full((96,), 1.5))  # "cat" is the 2nd content token
    torch.testing.assert_close(ratio[0, [0, 1, 3, 10]], torch.ones(4, 96))
    torch.testing.assert_close(weighted["text_embeds"], plain["text_embeds"], atol=0, rtol=0)


# ---- size conditioning ------------------------------------------------------------------------------

def test_size_conditioning_of_a_cropped_and_flipped_sample(tmp_path, pipe):
    folder = tmp_path / "train"
    os.makedirs(folder)
    Image.new("RGB", (101, 64), (200, 10, 10)).save(folder / "wide.png")
    spec = DatasetGroupSpec([DatasetSpec(subsets=[SubsetSpec(image_dir=str(folder), class_tokens="x", flip_aug=True)],
                                         batch_size=1, resolution=(64, 64))], source="test")
    dataset = TrainDataset.from_spec(spec, seed=0)
    seen = {}
    for epoch in range(1, 12):
        batch = dataset.make_batch([SampleRef(0, 0)], epoch, 0)
        seen[tuple(batch["crop_top_lefts"][0].tolist())] = size_time_ids(batch)[0].tolist()
    # 101x64 is centre-cropped to 64x64: 18 px cut on the left, 19 on the right (the left seen when flipped)
    assert seen == {(0, 18): [64, 101, 0, 18, 64, 64], (0, 19): [64, 101, 0, 19, 64, 64]}
    diffusers_ids = pipe._get_add_time_ids((64, 101), (0, 19), (64, 64), torch.float32, text_encoder_projection_dim=64)
    assert diffusers_ids.tolist() == [seen[(0, 19)]]


def test_predict_passes_text_embeds_and_size_ids_to_the_unet(pipe):
    family = SDXLFamily()
    conditioning = {"encoder_hidden_states": torch.randn(2, 77, 96), "text_embeds": torch.randn(2, 64)}
    batch = {"original_sizes_hw": torch.tensor([[64, 101], [80, 64]]),
             "crop_top_lefts": torch.tensor([[0, 19], [8, 0]]),
             "target_sizes_hw": torch.tensor([[64, 64], [64, 64]])}
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        prediction = family.predict(components_of(pipe), latents, timesteps, conditioning, batch)
        expected = pipe.unet(latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
                             added_cond_kwargs={"text_embeds": conditioning["text_embeds"],
                                                "time_ids": torch.tensor([[64., 101, 0, 19, 64, 64],
                                                                          [80, 64, 8, 0, 64, 64]])}).sample
        other_crop = family.predict(components_of(pipe), latents, timesteps, conditioning,
                                    {**batch, "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long)})
    torch.testing.assert_close(prediction, expected, atol=0, rtol=0)
    assert not torch.allclose(prediction, other_crop)


# ---- SGM layout, configs, LoRA names -------------------------------------------------------------------

def test_sgm_layout_names_and_inferred_configs(pipe):
    state = sgm.diffusers_to_sgm(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.4.1.proj_in.weight",
                "model.diffusion_model.output_blocks.2.2.conv.weight",
                "first_stage_model.encoder.down.0.block.0.conv1.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "conditioner.embedders.1.model.logit_scale"):
        assert key in state, key
    projection = pipe.text_encoder_2.text_projection.weight
    assert torch.equal(state["conditioner.embedders.1.model.text_projection"], projection.T)
    parts = sgm.split_sgm_state_dict(state)
    config = sgm.infer_sdxl_unet_config(parts["unet"], pooled_dim=64)
    for key, value in config.items():
        if key not in ("_class_name", "sample_size"):
            expected = pipe.unet.config[key]
            assert list(value) == list(expected) if isinstance(value, list) else value == expected, key
    bigg = sgm.infer_bigg_config(parts["bigg"])
    sizes = (bigg["hidden_size"], bigg["num_hidden_layers"], bigg["projection_dim"], bigg["hidden_act"])
    assert sizes == (64, 2, 64, "gelu")
    assert sgm.infer_sdxl_vae_config(parts["vae"])["scaling_factor"] == 0.13025


def test_lora_names_follow_sd_scripts_sdxl_layout(pipe):
    from networks.lora import create_network

    targets = SDXLFamily().lora_targets(components_of(pipe))
    network = create_network(targets, network_dim=2, network_alpha=1, network_args={"conv_dim": "2"})
    names = set(network.modules_by_name)
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_input_blocks_7_1_transformer_blocks_1_ff_net_0_proj",
                 "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k", "lora_unet_middle_block_0_in_layers_2",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_output_blocks_8_0_skip_connection", "lora_unet_input_blocks_1_0_emb_layers_1",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_1_mlp_fc2"):
        assert name in names, name
    for prefix in ("lora_te1_", "lora_te2_"):  # q, k, v, out, fc1, fc2 of 2 layers
        assert len([n for n in names if n.startswith(prefix)]) == 12
    assert not any("text_projection" in n or "label_emb" in n for n in names)


# ---- text-encoder cache identity ----------------------------------------------------------------------

def test_text_encoder_cache_identity_names_encoders_length_and_weighting(pipe):
    from library.tiny_models.sd import tiny_clip_text_model

    family, args = parse("--max_token_length", "150", "--weighted_captions")
    components = components_of(pipe)
    components.text_encoders_fingerprint = text_encoders_fingerprint(pipe.text_encoder, pipe.text_encoder_2)
    identity = family.text_encoder_outputs_caching_strategy(args, components).cache_identity()
    assert identity == {"family": "sdxl", "text_encoders": f"clip-l+openclip-bigg:{components.text_encoders_fingerprint}",
                        "hidden_layers": "clip-l[-2],bigg[-2]+pooled", "max_token_length": "150",
                        "weighted_captions": "true"}
    other_bigg = tiny_clip_text_model(hidden_size=64, with_projection=True, seed=5)
    assert text_encoders_fingerprint(pipe.text_encoder, other_bigg) != components.text_encoders_fingerprint


def test_vae_file_gets_the_sdxl_latent_scale(pipe, tmp_path):
    from library.models.sdxl_checkpoint import load_sdxl_vae

    state = sgm.diffusers_to_sgm(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    path = str(tmp_path / "sdxl_vae.safetensors")
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("first_stage_model.")}, path)
    full = str(tmp_path / "sdxl.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, full)
    from_checkpoint = SDXLFamily().load_vae(argparse.Namespace(vae=None, pretrained_model_name_or_path=full))
    for vae in (load_sdxl_vae(path), from_checkpoint):
        assert vae.config.scaling_factor == 0.13025
        for name, weight in pipe.vae.state_dict().items():
            assert torch.equal(vae.state_dict()[name], weight), name


# ---- wrong checkpoints --------------------------------------------------------------------------------

def test_wrong_family_files_and_folders_name_the_right_script(tmp_path):
    sd_file = str(tmp_path / "sd15.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1)}, sd_file)
    with pytest.raises(UserError, match="looks like a Stable Diffusion 1.x checkpoint; use sd_train_network.py"):
        load_sdxl_models(sd_file)
    refiner = str(tmp_path / "refiner.safetensors")
    save_file({"conditioner.embedders.0.model.text_projection": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, refiner)
    with pytest.raises(UserError, match="is an SDXL refiner"):
        load_sdxl_models(refiner)
    folder = tmp_path / "flux"
    os.makedirs(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="looks like a FLUX.1 checkpoint; use flux_train.py"):
        load_sdxl_models(str(folder), full_finetune=True)


def test_sdxl_file_given_to_the_sd_loader_names_the_sdxl_script(tmp_path):
    from library.models.sd_checkpoint import load_sd_models

    path = str(tmp_path / "xl.safetensors")
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="looks like a SDXL checkpoint; use sdxl_train_network.py"):
        load_sd_models(path)
