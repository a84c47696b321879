"""Family settings are validated once into a frozen value; the user's arguments are never rewritten;
the training mode reaches the flag checks as an explicit ModeKind."""

import argparse
import dataclasses

import pytest

from library.config.arguments import parse_training_args
from library.errors import UserError
from library.families import get_family
from library.training.modes import FULL, NETWORK, FullFineTuneMode, NetworkMode, make_mode

COMMON = ["--pretrained_model_name_or_path", "model.safetensors", "--output_dir", "out", "--train_data_dir", "img"]


def test_configure_returns_a_new_family_and_leaves_the_bare_one_alone():
    bare = get_family("sd")
    family, args = parse_training_args(bare, "full", [*COMMON, "--v2", "--v_parameterization"])
    assert family is not bare and type(family) is type(bare)
    assert (family.settings.kind, family.settings.v2, family.settings.v_parameterization) == (FULL, True, True)
    assert (bare.settings.kind, bare.settings.v2) == (NETWORK, False)  # defaults, untouched
    assert family.base_model_version == "sd_v2_v" and bare.base_model_version == "sd_v1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        family.settings.v2 = False


def test_lumina_default_shift_goes_into_the_settings_not_the_arguments():
    family, args = parse_training_args(get_family("lumina"), "network", [*COMMON, "--timestep_sampling", "shift"])
    assert args.discrete_flow_shift is None  # as the user gave it
    assert family.settings.flow_options.discrete_flow_shift == 6.0
    family, args = parse_training_args(get_family("lumina"), "network", [
        *COMMON, "--timestep_sampling", "shift", "--discrete_flow_shift", "2.5"])
    assert family.settings.flow_options.discrete_flow_shift == 2.5


def test_flux_settings_hold_what_predict_and_sampling_read():
    family, args = parse_training_args(get_family("flux"), "network", [
        *COMMON, "--apply_t5_attn_mask", "--guidance_scale", "2.0", "--fp8_base", "--save_lora_format", "diffusers"])
    settings = family.settings
    assert (settings.apply_t5_attn_mask, settings.guidance_scale, settings.save_lora_format) == (True, 2.0, "diffusers")
    assert (family.denoiser_storage, family.text_encoder_storage) == ("fp8", "fp8")  # sd-scripts: T5 too
    assert settings.t5xxl_max_token_length is None and settings.blocks_to_swap == 0


def test_the_mode_kind_decides_full_fine_tune_checks():
    parse_training_args(get_family("flux"), "network", [*COMMON, "--fp8_base"])  # fine for a LoRA
    with pytest.raises(UserError, match="--fp8_base stores the frozen denoiser in fp8, but a full fine-tune"):
        parse_training_args(get_family("flux"), "full", [*COMMON, "--fp8_base"])
    with pytest.raises(UserError, match="--learning_rate_te1 is for sdxl_train.py"):
        parse_training_args(get_family("sdxl"), "network", [*COMMON, "--learning_rate_te1", "1e-5"])


@pytest.mark.parametrize("mode, argv, switch", [
    ("network", [], "--network_train_unet_only"),
    ("full", ["--train_text_encoder"], "no --train_text_encoder"),
])
def test_cached_text_encoder_outputs_name_the_switch_of_the_mode(mode, argv, switch):
    with pytest.raises(UserError, match=f"cannot train the text encoders: use {switch}"):
        parse_training_args(get_family("sd"), mode, [*COMMON, "--cache_text_encoder_outputs", *argv])


def test_modes_share_one_interface():
    family, args = parse_training_args(get_family("sd"), "full", COMMON)
    mode = make_mode(family.settings.kind, family, args)
    assert isinstance(mode, FullFineTuneMode) and mode.kind.is_full_fine_tune and mode.architecture_suffix == ""
    family, args = parse_training_args(get_family("sd"), "network", [*COMMON, "--network_module", "networks.lora"])
    mode = make_mode(family.settings.kind, family, args)
    assert isinstance(mode, NetworkMode) and not mode.kind.is_full_fine_tune and mode.architecture_suffix == "/lora"
    assert NETWORK.trains_text_encoders(args)  # a LoRA trains the text encoders unless --network_train_unet_only
    assert not FULL.trains_text_encoders(argparse.Namespace(train_text_encoder=False))
