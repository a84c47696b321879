"""The facts about each model family in one table: names, scripts, and how its files are recognised.

Everything outside a family's own module that needs to know about "all families" reads this table:
`get_family` (which class to import), the tools' `--family` choices and sd-scripts' `--sdxl` /
`--flux` switches (library/tools_common.py), the diffusers pipeline class names that tell a model
folder's family, the tensor-name markers that tell a single-file checkpoint's family
(library/models/checkpoint_detect.py) and a LoRA file's family (library/lora_formats.py), and the
entry scripts an error message points to. Pure data: importing it imports no family code and no torch.
A new family adds one `FamilyFacts` row here (and its name to DETECTION_ORDER).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from library.errors import UserError, did_you_mean


@dataclass(frozen=True)
class CheckpointKind:
    """A kind of single-file checkpoint a family trains, recognised by substrings of its tensor names."""

    name: str  # "sd2"
    display_name: str  # "Stable Diffusion 2.x"
    markers: tuple[str, ...]


@dataclass(frozen=True)
class FamilyFacts:
    name: str  # "sdxl": --family value, cache file suffix, registry key
    display_name: str  # for --help and messages; the family class's display_name is the same
    family_class: str  # "module:Class" of its ModelFamily
    network_script: str  # the LoRA training script
    full_script: Optional[str]  # the full fine-tuning script (None: not available yet)
    tool_switch: Optional[str]  # sd-scripts' tools' switch for this family ("sdxl" for --sdxl)
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s of its diffusers folders
    checkpoint_kinds: tuple[CheckpointKind, ...]  # most specific first
    lora_markers: tuple[str, ...]  # LoRA module-name prefixes (kohya, diffusers and ComfyUI layouts)


def _kind(family: str, display_name: str, *markers: str) -> tuple[CheckpointKind, ...]:
    return (CheckpointKind(family, display_name, markers),)


FAMILIES: dict[str, FamilyFacts] = {facts.name: facts for facts in (
    FamilyFacts(
        "sd", "Stable Diffusion 1.x/2.x", "library.families.sd:SDFamily", "sd_train_network.py", "sd_train.py", None,
        ("StableDiffusionPipeline",),
        (CheckpointKind("sd2", "Stable Diffusion 2.x", ("cond_stage_model.model.",)),
         CheckpointKind("sd", "Stable Diffusion 1.x",
                        ("diffusion_model.input_blocks.", "cond_stage_model.transformer.", "first_stage_model."))),
        ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_", "lora_te_",
         "unet.down_blocks.0.attentions.", "unet.up_blocks.3.attentions.", "unet.", "text_encoder.",
         "diffusion_model.input_blocks.", "diffusion_model.output_blocks.", "diffusion_model.middle_block."),
    ),
    FamilyFacts(
        "sdxl", "SDXL", "library.families.sdxl:SDXLFamily", "sdxl_train_network.py", "sdxl_train.py", "sdxl",
        ("StableDiffusionXLPipeline",),
        _kind("sdxl", "SDXL", "conditioner.embedders.", "diffusion_model.label_emb.0.0.weight", "add_embedding.linear_1"),
        ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_",
         "text_encoder_2.", "unet.add_embedding.", "unet.up_blocks.0.attentions.", "diffusion_model.label_emb.",
         "diffusion_model.output_blocks.0.1.", "diffusion_model.output_blocks.1.1."),
    ),
    FamilyFacts(
        "flux", "FLUX.1", "library.families.flux:FluxFamily", "flux_train_network.py", "flux_train.py", "flux",
        ("FluxPipeline",),
        _kind("flux", "FLUX.1", "double_blocks.0.img_attn", "single_transformer_blocks.0."),
        ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "transformer.single_transformer_blocks.",
         "diffusion_model.double_blocks.", "diffusion_model.single_blocks."),
    ),
    FamilyFacts(
        "sd3", "SD3/SD3.5", "library.families.sd3:SD3Family", "sd3_train_network.py", "sd3_train.py", None,
        ("StableDiffusion3Pipeline",),
        _kind("sd3", "SD3/SD3.5", "joint_blocks.0.", "context_embedder.weight"),
        ("lora_unet_joint_blocks_", "diffusion_model.joint_blocks."),
    ),
    FamilyFacts(
        "lumina", "Lumina Image 2.0", "library.families.lumina:LuminaFamily", "lumina_train_network.py",
        "lumina_train.py", None,
        ("Lumina2Pipeline", "Lumina2Text2ImgPipeline"),
        _kind("lumina", "Lumina Image 2.0", "noise_refiner.", "context_refiner."),
        ("lora_unet_noise_refiner_", "lora_unet_context_refiner_", "lora_unet_layers_", "transformer.noise_refiner.",
         "transformer.context_refiner.", "transformer.layers.", "diffusion_model.noise_refiner.",
         "diffusion_model.context_refiner.", "diffusion_model.layers."),
    ),
)}
FAMILY_NAMES = tuple(FAMILIES)

# Markers are tried family by family in this order, more specific layouts first: a FLUX diffusers
# transformer also has SD3's `context_embedder.weight`, and SDXL files also hold the
# `diffusion_model.input_blocks.` names of SD files (SDXL LoRAs the `unet.` names of SD LoRAs).
DETECTION_ORDER = ("flux", "lumina", "sd3", "sdxl", "sd")


def family_facts(name: str) -> FamilyFacts:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}{did_you_mean(name, FAMILIES)}")
    return FAMILIES[name]


def family_of_pipeline_class(class_name: str) -> Optional[str]:
    """The family whose diffusers pipeline is `class_name` (from model_index.json), or None."""
    return next((facts.name for facts in FAMILIES.values() if class_name in facts.pipeline_classes), None)


def checkpoint_kinds() -> list[tuple[FamilyFacts, CheckpointKind]]:
    """Every (family, checkpoint kind) in detection order."""
    return [(FAMILIES[name], kind) for name in DETECTION_ORDER for kind in FAMILIES[name].checkpoint_kinds]


def lora_markers() -> list[tuple[str, tuple[str, ...]]]:
    """(family name, LoRA name prefixes) in detection order."""
    return [(name, FAMILIES[name].lora_markers) for name in DETECTION_ORDER]
