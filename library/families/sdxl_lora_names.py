"""Where SDXL LoRA modules live: in checkpoint files (for merging) and in each LoRA file layout.

sd-scripts names SDXL UNet LoRA modules after their LDM paths (`lora_unet_input_blocks_4_1_...`),
which are also the names inside SGM single files (`model.diffusion_model.input_blocks.4.1...`), so a
single file maps by prefix; a diffusers folder's UNet maps through the SGM rules
(library/models/sgm_layout.py). CLIP-L modules are `lora_te1_*`; bigG's are `lora_te2_*`, and its
SGM file form fuses q, k and v into `in_proj_weight` (one row slice each). `sdxl_lora_module_names`
lists every layer of a full-size SDXL UNet and both text encoders, built on the meta device.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

from library.families.base import LoraBlockLayout, LoraFileLayout, LoraModuleNames, LoraWeightSlice
from library.families.sd_lora_names import open_clip_slices, weight_layers, weight_modules
from library.models import sgm_layout

TE_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
BIGG_LAYERS = 32
CLIP_L_LAYERS = 12


def _flat(path: str) -> str:
    return path.replace(".", "_")


_UNET_BLOCK_STARTS = (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13))


def sdxl_unet_block_index(kohya_name: str) -> Optional[int]:
    """sd-scripts' block of an SDXL UNet LoRA module (its LDM name): time/label embedding = 0,
    input_blocks.N = 1 + N (IN00-IN08), middle_block.N = 10 + N (MID00-02), output_blocks.N = 13 + N
    (OUT00-OUT08), the output layers = 22."""
    name = kohya_name.removeprefix("lora_unet_")
    for start, first in _UNET_BLOCK_STARTS:
        if name.startswith(start):
            return first + int(name[len(start):].split("_")[0])
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    return 22 if name.startswith("out_") else None


SDXL_UNET_BLOCKS = LoraBlockLayout(down=9, mid=3, extra=1, block_index=sdxl_unet_block_index)


def text_module_path(path: str) -> str:
    """CLIP module path in transformers-4 form (`text_model.` level kept; transformers 5 drops it
    for CLIPTextModel), which is what kohya and diffusers LoRA names spell out."""
    inner = path.removeprefix("text_model.")
    return inner if inner == "text_projection" else "text_model." + inner


def _unet_structure(keys) -> dict:
    """What the SGM renaming rules need of a UNet config, read from diffusers key names."""
    def indices(pattern: str) -> list[int]:
        return sorted({int(m.group(1)) for key in keys if (m := re.match(pattern, key))})

    levels = len(indices(r"down_blocks\.(\d+)\."))
    def kinds(side: str, cross: str, plain: str) -> list[str]:
        return [cross if indices(rf"{side}\.{i}\.attentions\.(\d+)\.") else plain for i in range(levels)]

    return {
        "block_out_channels": [0] * levels, "layers_per_block": len(indices(r"down_blocks\.0\.resnets\.(\d+)\.")),
        "down_block_types": kinds("down_blocks", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": kinds("up_blocks", "CrossAttnUpBlock2D", "UpBlock2D"),
    }


def _diffusers_unet_slices(shapes: dict) -> dict[str, list[LoraWeightSlice]]:
    weights = {key: key for key in shapes if key.endswith(".weight")}
    ldm_to_diffusers = sgm_layout.convert_sdxl_unet_to_ldm(weights, _unet_structure(shapes))
    return {diffusers_key: [LoraWeightSlice("lora_unet_" + _flat(ldm_key[:-7]))]
            for ldm_key, diffusers_key in ldm_to_diffusers.items()}


def sdxl_checkpoint_lora_slices(shapes: dict, component: str) -> dict[str, list[LoraWeightSlice]]:
    """The kohya LoRA modules that change each tensor of an SDXL checkpoint file (see ModelFamily)."""
    if component == "unet":
        return _diffusers_unet_slices(shapes)
    if component in TE_PREFIXES:
        prefix = TE_PREFIXES[component]
        return {m + ".weight": [LoraWeightSlice(prefix + _flat(text_module_path(m)))] for m in weight_modules(shapes)}
    if component != "checkpoint":
        return {}
    parts = sgm_layout.split_sgm_state_dict(shapes)
    slices = {sgm_layout.UNET_PREFIX + m + ".weight": [LoraWeightSlice("lora_unet_" + _flat(m))]
              for m in weight_modules(parts["unet"])}
    for module in weight_modules(parts["clip_l"]):
        name = TE_PREFIXES["text_encoder"] + _flat(text_module_path(module))
        slices[sgm_layout.CLIP_L_PREFIX + module + ".weight"] = [LoraWeightSlice(name)]
    slices.update(open_clip_slices(parts["bigg"], sgm_layout.BIGG_PREFIX, TE_PREFIXES["text_encoder_2"] + "text_model_"))
    return slices


def _sdxl_unet_config() -> dict:
    """SDXL base 1.0's UNet (diffusers' published config)."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


@lru_cache(maxsize=1)
def sdxl_lora_module_names() -> tuple[LoraModuleNames, ...]:
    """Every Linear/Conv2d of a full-size SDXL UNet, CLIP-L and bigG, under each layout's name."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_sdxl_unet_config())
        clip_l = CLIPTextModel(CLIPTextConfig(num_hidden_layers=CLIP_L_LAYERS))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=BIGG_LAYERS))
    renames = sgm_layout.unet_lora_renames(unet)
    names = [LoraModuleNames(kohya="lora_unet_" + _flat(renames[path]), diffusers=f"unet.{path}",
                             comfy="diffusion_model." + renames[path])
             for path in weight_layers(unet)]
    for component, encoder in (("text_encoder", clip_l), ("text_encoder_2", bigg)):
        for path in weight_layers(encoder):
            full = text_module_path(path)
            names.append(LoraModuleNames(kohya=TE_PREFIXES[component] + _flat(full), diffusers=f"{component}.{full}",
                                         comfy=f"{component}.{full}"))
    return tuple(names)


class SDXLLoraFileLayout(LoraFileLayout):
    def checkpoint_slices(self, shapes: dict, component: str):
        return sdxl_checkpoint_lora_slices(shapes, component)

    def module_names(self):
        return list(sdxl_lora_module_names())
