"""Where SD 1.x/2.x LoRA modules live: in checkpoint files (for merging) and in each LoRA file layout.

sd-scripts names SD 1.x/2.x LoRA modules after diffusers' module paths (`lora_unet_down_blocks_0_...`,
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`), while single-file checkpoints use LDM names
(`model.diffusion_model.input_blocks.1.1...`) and SD 2.x's OpenCLIP fuses q, k and v into one
`in_proj_weight`. `sd_checkpoint_lora_slices` maps a checkpoint file's tensors to the LoRA modules
that change them, through the same LDM rules the SD saver uses (library/models/sd_ldm_layout.py).
`sd_lora_module_names` lists every layer of a full-size SD UNet and text encoder (built on the meta
device, so no memory) under its kohya, diffusers (PEFT) and ComfyUI names.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

from library.families.base import LoraBlockLayout, LoraFileLayout, LoraModuleNames, LoraWeightSlice
from library.models import sd_ldm_layout as layout

UNET_KOHYA_PREFIX = "lora_unet_"
TE_KOHYA_PREFIX = "lora_te_text_model_"
# the largest SD text encoder: OpenCLIP-H, 24 layers in the file (23 used); CLIP-L has 12
MAX_TEXT_ENCODER_LAYERS = 24
_OPEN_CLIP_TO_CLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _flat(path: str) -> str:
    return path.replace(".", "_")


def unet_lora_name(diffusers_module_path: str) -> str:
    return UNET_KOHYA_PREFIX + _flat(diffusers_module_path)


def text_encoder_lora_name(clip_module_path: str) -> str:
    """CLIP path with or without transformers 4's `text_model.` level -> kohya name (which has it)."""
    return TE_KOHYA_PREFIX + _flat(clip_module_path.removeprefix("text_model."))


_UNET_BLOCK = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")
BLOCKS_PER_SIDE = 12  # IN00-IN11 and OUT00-OUT11, as sd-scripts counts them


def sd_unet_block_index(kohya_name: str) -> Optional[int]:
    """sd-scripts' block of an SD 1.x/2.x UNet LoRA module: IN01-IN11 = 1-11 (three slots per level:
    two resnets/attentions, then the downsampler; IN00, conv_in, has no LoRA), MID = 12, OUT00-OUT11 =
    13-24 (three resnets/attentions per level, the upsampler sharing the third slot)."""
    match = _UNET_BLOCK.match(kohya_name)
    if match:
        side, level, kind, index = match.groups()
        slot = 3 * int(level) + (2 if kind.endswith("samplers") else int(index))
        return 1 + slot if side == "down" else BLOCKS_PER_SIDE + 1 + slot
    if kohya_name.startswith("lora_unet_mid_block_"):
        return BLOCKS_PER_SIDE
    return None


SD_UNET_BLOCKS = LoraBlockLayout(down=BLOCKS_PER_SIDE, mid=1, extra=0, block_index=sd_unet_block_index)


def weight_modules(keys) -> list[str]:
    return [key[: -len(".weight")] for key in keys if key.endswith(".weight")]


def _unet_rules_without_absent_attentions(config) -> list:
    """unet_key_rules lists attention rules for every block; where a block has no attentions, its
    upsampler shares that LDM slot, so reading LDM names back needs those rules gone."""
    absent = [f"down_blocks.{i}.attentions." for i, kind in enumerate(config["down_block_types"])
              if not kind.startswith("CrossAttn")]
    absent += [f"up_blocks.{i}.attentions." for i, kind in enumerate(config["up_block_types"])
               if not kind.startswith("CrossAttn")]
    return [rule for rule in layout.unet_key_rules(config) if not rule[0].startswith(tuple(absent))]


def _unet_slices(ldm_unet: dict, v2: bool) -> dict[str, list[LoraWeightSlice]]:
    rules = _unet_rules_without_absent_attentions(layout.infer_unet_config(ldm_unet, v2))
    slices = {}
    for module in weight_modules(ldm_unet):
        diffusers_key = layout.ldm_unet_key_to_diffusers(module + ".weight", rules)
        if diffusers_key is not None:
            slices[layout.UNET_PREFIX + module + ".weight"] = [LoraWeightSlice(unet_lora_name(diffusers_key[:-7]))]
    return slices


def open_clip_slices(open_clip: dict, key_prefix: str, kohya_prefix: str) -> dict[str, list[LoraWeightSlice]]:
    """OpenCLIP text-encoder tensors (names without `key_prefix`) -> the kohya modules that change
    them, named `kohya_prefix` + CLIP path; the fused in_proj gets one row slice per q, k and v."""
    slices = {}
    for key, tensor in open_clip.items():
        parts = key.split(".")
        if parts[:2] != ["transformer", "resblocks"]:
            continue
        layer, rest = parts[2], ".".join(parts[3:])
        base = f"{kohya_prefix}encoder_layers_{layer}_"
        if rest == "attn.in_proj_weight":
            width = tensor.shape[0] // 3
            slices[key_prefix + key] = [
                LoraWeightSlice(f"{base}self_attn_{name}_proj", (i * width, (i + 1) * width)) for i, name in enumerate("qkv")
            ]
        elif rest.endswith(".weight") and rest[:-7] in _OPEN_CLIP_TO_CLIP:
            slices[key_prefix + key] = [LoraWeightSlice(base + _flat(_OPEN_CLIP_TO_CLIP[rest[:-7]]))]
    return slices


def sd_checkpoint_lora_slices(shapes: dict, component: str) -> dict[str, list[LoraWeightSlice]]:
    """The kohya LoRA modules that change each tensor of an SD checkpoint file (see ModelFamily)."""
    if component == "unet":
        return {m + ".weight": [LoraWeightSlice(unet_lora_name(m))] for m in weight_modules(shapes)}
    if component == "text_encoder":
        return {m + ".weight": [LoraWeightSlice(text_encoder_lora_name(m))] for m in weight_modules(shapes)}
    if component != "checkpoint":
        return {}  # vae, safety checker, ...: nothing a LoRA changes
    parts = layout.split_ldm_state_dict(shapes)
    v2 = bool(parts["open_clip"])
    slices = _unet_slices(parts["unet"], v2) if "input_blocks.0.0.weight" in parts["unet"] else {}
    if v2:
        slices.update(open_clip_slices(parts["open_clip"], layout.OPEN_CLIP_PREFIX, TE_KOHYA_PREFIX))
    for module in weight_modules(parts["clip"]):
        slices[layout.CLIP_PREFIX + module + ".weight"] = [LoraWeightSlice(text_encoder_lora_name(module))]
    return slices


def weight_layers(root) -> list[str]:
    import torch

    return [path for path, module in root.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]


@lru_cache(maxsize=1)
def sd_lora_module_names() -> tuple[LoraModuleNames, ...]:
    """Every Linear/Conv2d of a full-size SD UNet and text encoder, under each layout's name."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel()  # diffusers' defaults are the SD 1.x block layout
        text_encoder = CLIPTextModel(CLIPTextConfig(num_hidden_layers=MAX_TEXT_ENCODER_LAYERS))
    rules = layout.unet_key_rules(unet.config)
    names = [
        LoraModuleNames(kohya=unet_lora_name(path), diffusers=f"unet.{path}",
                        comfy="diffusion_model." + layout.diffusers_unet_key_to_ldm(path + ".weight", rules)[:-7])
        for path in weight_layers(unet)
    ]
    for path in weight_layers(text_encoder):
        path = "text_model." + path.removeprefix("text_model.")
        # ComfyUI maps diffusers' text-encoder names onto its CLIP-L / OpenCLIP-H models
        names.append(LoraModuleNames(kohya=text_encoder_lora_name(path), diffusers=f"text_encoder.{path}",
                                     comfy=f"text_encoder.{path}"))
    return tuple(names)


class SDLoraFileLayout(LoraFileLayout):
    def checkpoint_slices(self, shapes: dict, component: str):
        return sd_checkpoint_lora_slices(shapes, component)

    def module_names(self):
        return list(sd_lora_module_names())
