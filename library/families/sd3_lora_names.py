"""SD3 / SD3.5 LoRA module names in each file layout, for tools/convert_lora.py (library/lora_formats.py).

kohya names are sd-scripts' networks/lora_sd3.py names: `lora_unet_` + the SAI module path
(`joint_blocks_0_x_block_attn_qkv`, `_attn_proj`, `_mlp_fc1`, `_mlp_fc2`, `_adaLN_modulation_1`, the same
under `context_block`, `x_block_attn2_*` in SD3.5's dual-attention blocks), `lora_te1_`/`lora_te2_` for
CLIP-L/CLIP-G. The diffusers layout names diffusers' modules (`transformer.transformer_blocks.0.attn.to_q`,
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`); an SAI `qkv` is three of them (fused modules).
ComfyUI's names are `diffusion_model.` + the SAI path and diffusers-style text-encoder names.
The tables cover the largest released models: 38 blocks (SD3.5 large), attn2 in blocks 0-12 (SD3.5 medium).
The adaLN of a model's last, context-pre-only block is left out: its rows are ordered differently in the
two layouts (see library/models/sd3_checkpoint.py), so the family does not train LoRA on it.
"""

from __future__ import annotations

from functools import lru_cache

from library.errors import UserError
from library.families.base import LoraFileLayout, LoraModuleNames

MAX_BLOCKS = 38  # SD3.5 large
DUAL_ATTENTION_BLOCKS = range(13)  # SD3.5 medium
CLIP_LAYERS = {"text_encoder": 12, "text_encoder_2": 32}  # CLIP-L, CLIP-G
TE_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
CLIP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
TRAINED_MODULES = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")


def kohya_name(sai_module: str) -> str:
    return "lora_unet_" + sai_module.replace(".", "_")


def _sai_modules():
    """(SAI module, its diffusers members) of every block module LoRA may train, over the released sizes."""
    from library.models.sd3_checkpoint import BLOCK_SIDES, sai_members

    for index in range(MAX_BLOCKS):
        for side, table in BLOCK_SIDES:
            for module in table:
                if module not in TRAINED_MODULES or (module.startswith("attn2") and index not in DUAL_ATTENTION_BLOCKS):
                    continue
                sai = f"joint_blocks.{index}.{side}.{module}"
                yield sai, sai_members(sai)


@lru_cache(maxsize=1)
def sd3_lora_module_names() -> tuple[LoraModuleNames, ...]:
    """Every layer named alike in each layout (the fused qkv modules are in sd3_fused_lora_module_names)."""
    names = [LoraModuleNames(kohya=kohya_name(sai), diffusers=f"transformer.{members[0]}", comfy=f"diffusion_model.{sai}")
             for sai, members in _sai_modules() if len(members) == 1]
    for component, layers in CLIP_LAYERS.items():
        for index in range(layers):
            for linear in CLIP_LINEARS:
                path = f"text_model.encoder.layers.{index}.{linear}"
                names.append(LoraModuleNames(kohya=TE_PREFIXES[component] + path.replace(".", "_"),
                                             diffusers=f"{component}.{path}", comfy=f"{component}.{path}"))
    return tuple(names)


@lru_cache(maxsize=1)
def sd3_fused_lora_module_names() -> dict[str, tuple[str, tuple[str, ...]]]:
    """kohya name of each SAI qkv -> (ComfyUI name, its diffusers q, k, v layers in row order)."""
    return {kohya_name(sai): (f"diffusion_model.{sai}", tuple(f"transformer.{m}" for m in members))
            for sai, members in _sai_modules() if len(members) > 1}


class SD3LoraFileLayout(LoraFileLayout):
    def module_names(self):
        return list(sd3_lora_module_names())

    def fused_module_names(self):
        return sd3_fused_lora_module_names()

    def fused_row_sizes(self, kohya_name: str, down, up) -> list[int]:
        """An SAI qkv's rows are q, k and v of equal width."""
        if up.shape[0] % 3:
            raise UserError(f"LoRA module {kohya_name}: lora_up has {up.shape[0]} rows, not three equal q/k/v parts")
        return [up.shape[0] // 3] * 3
