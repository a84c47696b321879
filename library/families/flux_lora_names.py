"""Where FLUX.1 LoRA modules live: in checkpoint files (for merging) and in each LoRA file layout.

sd-scripts (and ComfyUI) name FLUX LoRA modules after BFL's linears (`lora_unet_double_blocks_0_img_attn_qkv`,
`..._single_blocks_0_linear1`), which are the tensors of BFL files, so those merge one to one. BFL
fuses q, k, v (and in single blocks the MLP input) into one linear where diffusers keeps separate
layers: in the diffusers layout such a module becomes its members with a shared down and the up's
rows split (`fused_module_names`, `fused_row_sizes`), and merged into a diffusers folder
each member tensor takes its rows of the up (`up_rows`). CLIP-L modules are `lora_te1_*`, T5-XXL's
`lora_te3_*` (sd-scripts' names); their separate files (clip_l.safetensors, t5xxl_fp16.safetensors)
hold transformers' names. BFL's `final_layer.adaLN_modulation.1` stores diffusers' `norm_out.linear`
with its halves swapped, so a LoRA on it is not renamed (neither layout's trainers target it).
"""

from __future__ import annotations

from functools import lru_cache

from library.families.base import LoraFileLayout, LoraModuleNames, LoraWeightSlice
from library.families.sd_lora_names import weight_layers, weight_modules
from library.models import flux_checkpoint as ckpt

RELEASED_BLOCKS = {"double_blocks": 19, "single_blocks": 38}  # FLUX.1 dev/schnell
COMPONENT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}  # CLIP-L, T5-XXL
T5_LAYERS, CLIP_L_LAYERS = 24, 12
COMFY_TEXT_PREFIXES = {"text_encoder": "text_encoder.", "text_encoder_2": "text_encoders.t5xxl.transformer."}


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _block_linears():
    """(BFL block list, diffusers block list, index count, {BFL linear: diffusers members})."""
    lists = {bfl: (diffusers, linears) for bfl, diffusers, linears, _ in ckpt.BLOCK_LISTS}
    for bfl_list, count in RELEASED_BLOCKS.items():
        diffusers_list, linears = lists[bfl_list]
        yield bfl_list, diffusers_list, count, linears


def flux_fused_lora_module_names() -> dict[str, tuple[str, tuple[str, ...]]]:
    fused = {}
    for bfl_list, diffusers_list, count, linears in _block_linears():
        for i in range(count):
            for bfl, members in linears.items():
                if len(members) > 1:
                    path = f"{bfl_list}.{i}.{bfl}"
                    fused["lora_unet_" + _flat(path)] = (
                        f"diffusion_model.{path}", tuple(f"transformer.{diffusers_list}.{i}.{m}" for m in members))
    return fused


def flux_fused_row_sizes(kohya_name: str, down, up) -> list[int]:
    """q, k, v are each the model width (the down's input); single blocks add the MLP input after."""
    width, rows = int(down.shape[1]), int(up.shape[0])
    if kohya_name.endswith("_linear1"):
        return [width, width, width, rows - 3 * width]
    return [rows // 3] * 3


def _transformer_names() -> list[LoraModuleNames]:
    names = []
    for bfl_list, diffusers_list, count, linears in _block_linears():
        for i in range(count):
            for bfl, members in linears.items():
                if len(members) == 1:
                    path = f"{bfl_list}.{i}.{bfl}"
                    names.append(LoraModuleNames("lora_unet_" + _flat(path), f"transformer.{diffusers_list}.{i}."
                                                 f"{members[0]}", f"diffusion_model.{path}"))
    for bfl, diffusers in ckpt.GLOBAL_LINEARS.items():
        if bfl not in ckpt.SWAPPED_HALVES:
            names.append(LoraModuleNames("lora_unet_" + _flat(bfl), f"transformer.{diffusers}", f"diffusion_model.{bfl}"))
    return names


@lru_cache(maxsize=1)
def flux_lora_module_names() -> tuple[LoraModuleNames, ...]:
    """Every unfused BFL linear of FLUX.1 and every linear of CLIP-L and T5-XXL, in each layout."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from library.families.sdxl_lora_names import text_module_path

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(num_hidden_layers=CLIP_L_LAYERS))
        t5 = T5EncoderModel(T5Config(d_model=64, d_kv=8, d_ff=64, num_layers=T5_LAYERS, num_heads=8,
                                     feed_forward_proj="gated-gelu"))
    names = _transformer_names()
    for path in weight_layers(clip):
        full = text_module_path(path)
        names.append(LoraModuleNames("lora_te1_" + _flat(full), f"text_encoder.{full}", f"text_encoder.{full}"))
    for path in weight_layers(t5):
        names.append(LoraModuleNames("lora_te3_" + _flat(path), f"text_encoder_2.{path}",
                                     COMFY_TEXT_PREFIXES["text_encoder_2"] + path))
    return tuple(names)


def _bfl_slices(shapes: dict) -> dict[str, list[LoraWeightSlice]]:
    """BFL file (with or without `model.diffusion_model.`): every linear is its kohya module."""
    slices = {}
    for module in weight_modules(shapes):
        bfl = module.removeprefix(ckpt.BFL_PREFIX)
        if bfl not in ckpt.SWAPPED_HALVES:
            slices[module + ".weight"] = [LoraWeightSlice("lora_unet_" + _flat(bfl))]
    return slices


def _diffusers_transformer_slices(shapes: dict) -> dict[str, list[LoraWeightSlice]]:
    """diffusers FLUX transformer: each layer takes its rows of the BFL-named (maybe fused) module."""
    slices = {}
    for module in weight_modules(shapes):
        bfl = ckpt.diffusers_to_bfl_module(module)
        if bfl is None or bfl in ckpt.SWAPPED_HALVES:
            continue
        name = "lora_unet_" + _flat(bfl)
        members = _members(bfl)
        if len(members) == 1:
            slices[module + ".weight"] = [LoraWeightSlice(name)]
            continue
        block = _block_prefix(module, members)
        start = 0
        for member in members:
            size = shapes[block + member + ".weight"].shape[0]
            if block + member == module:
                slices[module + ".weight"] = [LoraWeightSlice(name, up_rows=(start, start + size))]
            start += size
    return slices


def _members(bfl: str) -> tuple[str, ...]:
    for bfl_list, _, linears, _ in ckpt.BLOCK_LISTS:
        if bfl.startswith(bfl_list + "."):
            return linears[bfl.split(".", 2)[2]]
    return (bfl,)


def _block_prefix(module: str, members: tuple[str, ...]) -> str:
    """'transformer_blocks.0.attn.to_k' -> 'transformer_blocks.0.' (the block holding the members)."""
    for member in members:
        if module.endswith("." + member):
            return module[: -len(member)]
    raise ValueError(f"{module} is none of {members}")


def flux_checkpoint_lora_slices(shapes: dict, component: str) -> dict[str, list[LoraWeightSlice]]:
    """The kohya LoRA modules that change each tensor of a FLUX checkpoint file (see ModelFamily)."""
    from library.families.sdxl_lora_names import text_module_path

    if component == "checkpoint":
        return _bfl_slices(shapes)
    if component == "transformer":
        return _diffusers_transformer_slices(shapes)
    if component == "text_encoder":
        return {m + ".weight": [LoraWeightSlice("lora_te1_" + _flat(text_module_path(m)))] for m in weight_modules(shapes)}
    if component == "text_encoder_2":
        return {m + ".weight": [LoraWeightSlice("lora_te3_" + _flat(m))] for m in weight_modules(shapes)
                if m.startswith("encoder.")}
    return {}


class FluxLoraFileLayout(LoraFileLayout):
    separate_text_encoder_components = {"text_encoder": "clip_l.safetensors", "text_encoder_2": "t5xxl_fp16.safetensors"}

    def checkpoint_slices(self, shapes: dict, component: str):
        return flux_checkpoint_lora_slices(shapes, component)

    def module_names(self):
        return list(flux_lora_module_names())

    def fused_module_names(self):
        return flux_fused_lora_module_names()

    def fused_row_sizes(self, kohya_name: str, down, up) -> list[int]:
        return flux_fused_row_sizes(kohya_name, down, up)
