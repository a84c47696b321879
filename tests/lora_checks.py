"""Checks that a kohya-format LoRA file is applied exactly by diffusers (a client we did not write).

The map from file names to layers is rebuilt here from the pipeline's own module names (for SDXL's
UNet, their LDM paths by sdxl_unet_ldm_path), not taken from networks/ or library/, so a naming bug
in our network cannot hide itself.
"""

import torch
from safetensors.torch import load_file


def expected_delta(down, up, scale):
    """W' - W for one kohya module (Linear, 1x1 or kxk conv down + 1x1 conv up)."""
    if down.dim() == 2:
        return scale * up @ down
    rank = down.shape[0]
    flat = up.reshape(-1, rank) @ down.reshape(rank, -1)
    return scale * flat.reshape(up.shape[0], *down.shape[1:])


def _linear_and_conv_paths(root):
    return [path for path, module in root.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]


def sd15_layers_by_kohya_name(pipe) -> dict:
    """kohya name -> (pipeline attribute, module path) for every Linear/Conv2d of the UNet and text encoder."""
    layers = {"lora_unet_" + path.replace(".", "_"): ("unet", path) for path in _linear_and_conv_paths(pipe.unet)}
    te_prefix = "lora_te_" if hasattr(pipe.text_encoder, "text_model") else "lora_te_text_model_"
    for path in _linear_and_conv_paths(pipe.text_encoder):
        layers[te_prefix + path.replace(".", "_")] = ("text_encoder", path)
    return layers


_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sdxl_unet_ldm_path(path: str, config) -> str:
    """The LDM (SGM) module path of a diffusers SDXL UNet module, written independently of library/."""
    parts, per_level = path.split("."), config.layers_per_block
    top = {"time_embedding": {"linear_1": "time_embed.0", "linear_2": "time_embed.2"},
           "add_embedding": {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}}
    if parts[0] in top:
        return top[parts[0]][parts[1]]
    if parts[0] in ("conv_in", "conv_norm_out", "conv_out"):
        return {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[parts[0]]
    if parts[0] == "mid_block":
        kind, rest = parts[1], parts[3:]
        block = f"middle_block.{1 if kind == 'attentions' else 2 * int(parts[2])}"
    else:
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(level + 1) * (per_level + 1)}.0.op"
            block = f"input_blocks.{1 + level * (per_level + 1) + j}.{0 if kind == 'resnets' else 1}"
        elif kind == "upsamplers":
            slot = 2 if config.up_block_types[level].startswith("CrossAttn") else 1
            return f"output_blocks.{level * (per_level + 1) + per_level}.{slot}.conv"
        else:
            block = f"output_blocks.{level * (per_level + 1) + j}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets":
        rest = [_RESNET_LDM.get(rest[0], rest[0])] + rest[1:]
    return ".".join([block, *rest])


def sdxl_layers_by_kohya_name(pipe) -> dict:
    """kohya name -> (pipeline attribute, module path): LDM names for the UNet, lora_te1_/lora_te2_."""
    layers = {}
    for path in _linear_and_conv_paths(pipe.unet):
        layers["lora_unet_" + sdxl_unet_ldm_path(path, pipe.unet.config).replace(".", "_")] = ("unet", path)
    for prefix, attribute in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        encoder = getattr(pipe, attribute)
        kohya_prefix = prefix if hasattr(encoder, "text_model") else prefix + "text_model_"
        for path in _linear_and_conv_paths(encoder):
            layers[kohya_prefix + path.replace(".", "_")] = (attribute, path)
    return layers


def assert_diffusers_applies_every_module(make_pipeline, lora_path: str,
                                          layers_by_kohya_name=sd15_layers_by_kohya_name) -> int:
    """Load `lora_path` with diffusers' load_lora_weights, fuse, and compare every module's weight
    with W + alpha/rank * up @ down. Returns how many modules were checked."""
    tensors = load_file(lora_path)
    names = sorted({key.split(".")[0] for key in tensors})
    pipe = make_pipeline()
    layers = layers_by_kohya_name(pipe)
    unknown = [name for name in names if name not in layers]
    assert not unknown, f"LoRA names with no layer of that name: {unknown[:5]}"

    def weight(name):
        attribute, path = layers[name]
        return getattr(pipe, attribute).get_submodule(path).weight.detach()

    before = {name: weight(name).clone() for name in names}
    pipe.load_lora_weights(lora_path)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for name in names:
        fused = weight(name)
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        scale = tensors[f"{name}.alpha"].item() / down.shape[0]
        if up.any():  # an untrained module (up still zero, e.g. on a layer the model never reads) changes nothing
            assert not torch.equal(fused, before[name]), f"diffusers did not apply {name}"
        torch.testing.assert_close(fused, before[name] + expected_delta(down, up, scale), atol=1e-5, rtol=0)
    return len(names)
