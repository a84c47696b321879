"""Checks that a kohya-format LoRA file is applied exactly by diffusers (a client we did not write).

The map from file names to layers is rebuilt here from the pipeline's own module names, not taken
from networks/, so a naming bug in our network cannot hide itself.
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


def sd15_layers_by_kohya_name(pipe) -> dict:
    """kohya name -> (root name, module path) for every Linear/Conv2d of the UNet and text encoder."""
    layers = {}
    for root_name, prefix, root in (("unet", "lora_unet_", pipe.unet), ("te", "lora_te_text_model_", pipe.text_encoder)):
        for path, module in root.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                layers[prefix + path.replace(".", "_")] = (root_name, path)
    return layers


def assert_diffusers_applies_every_module(make_pipeline, lora_path: str) -> int:
    """Load `lora_path` with diffusers' load_lora_weights, fuse, and compare every module's weight
    with W + alpha/rank * up @ down. Returns how many modules were checked."""
    tensors = load_file(lora_path)
    names = sorted({key.split(".")[0] for key in tensors})
    pipe = make_pipeline()
    layers = sd15_layers_by_kohya_name(pipe)
    roots = {"unet": pipe.unet, "te": pipe.text_encoder}
    before = {name: roots[layers[name][0]].get_submodule(layers[name][1]).weight.detach().clone() for name in names}
    pipe.load_lora_weights(lora_path)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for name in names:
        root, path = layers[name]
        fused = roots[root].get_submodule(path).weight.detach()
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        scale = tensors[f"{name}.alpha"].item() / down.shape[0]
        assert not torch.equal(fused, before[name]), f"diffusers did not apply {name}"
        torch.testing.assert_close(fused, before[name] + expected_delta(down, up, scale), atol=1e-5, rtol=0)
    return len(names)
