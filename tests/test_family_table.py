"""The family table (library/families/table.py) agrees with the family classes, the scripts in the
repository and the detectors that read it."""

import os

import pytest

from library.errors import UserError
from library.families import get_family
from library.families.table import FAMILIES, DETECTION_ORDER, family_of_pipeline_class
from library.lora_formats import describe_file_kind, detect_family
from library.models.checkpoint_detect import detect_checkpoint_family, wrong_family_error
from library.tools_common import FAMILY_SWITCHES, choose_family_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_row_matches_its_family_class_and_scripts(name):
    facts = FAMILIES[name]
    family = get_family(name)
    assert (family.name, family.display_name) == (facts.name, facts.display_name)
    for script in (facts.network_script, facts.full_script):
        if script is not None:
            assert os.path.isfile(os.path.join(ROOT, script)), f"{script} named by the table does not exist"
    for class_name in facts.pipeline_classes:
        assert family_of_pipeline_class(class_name) == name


def test_every_family_is_detected_and_no_script_is_missing():
    assert sorted(DETECTION_ORDER) == sorted(FAMILIES)
    scripts = {f for f in os.listdir(ROOT) if f.endswith("_train.py") or f.endswith("_train_network.py")}
    named = {s for facts in FAMILIES.values() for s in (facts.network_script, facts.full_script) if s}
    assert scripts == named


def test_checkpoint_markers_name_the_right_script():
    assert detect_checkpoint_family(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]) == "flux"
    assert detect_checkpoint_family(["context_embedder.weight", "single_transformer_blocks.0.norm.linear.weight"]) \
        == "flux"  # a diffusers FLUX transformer also holds SD3's context_embedder
    assert detect_checkpoint_family(["cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert str(wrong_family_error("x.safetensors", "sd2")) == \
        "x.safetensors looks like a Stable Diffusion 2.x checkpoint; use sd_train_network.py"
    assert str(wrong_family_error("x.safetensors", "lumina", full_finetune=True)).endswith("use lumina_train.py")
    assert str(wrong_family_error("x", "flux", full_finetune=True)).endswith("use flux_train.py")


def test_lora_markers_and_names_come_from_the_table():
    assert detect_family(["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"]) == "sd3"
    assert detect_family(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"]) == "sdxl"
    assert describe_file_kind(["lora_unet_layers_0_attention_qkv.lora_down.weight"]) == \
        "a Lumina Image 2.0 LoRA in kohya layout"


def test_tool_switches_choose_their_family():
    assert FAMILY_SWITCHES == {"sdxl": "sdxl", "flux": "flux"}
    assert choose_family_name(["--flux"]) == "flux" and choose_family_name([]) == "sd"
    with pytest.raises(UserError, match="unknown model family 'sdx'"):
        get_family("sdx")
