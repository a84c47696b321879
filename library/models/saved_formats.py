"""The `--save_model_as` formats of full fine-tunes beyond a family's own single file: sd-scripts'
`.ckpt`, and a diffusers folder for any pipeline diffusers has.

`ckpt` is what sd-scripts writes: `torch.save({"state_dict": ..., "epoch": N, "global_step": N})`
with the same tensors (and names) as the family's single `.safetensors` file. It holds nothing but
tensors and integers, so `torch.load(path, weights_only=True)` opens it without running code, and our
loaders read it that way. `diffusers` and `diffusers_safetensors` both write a diffusers folder with
safetensors weights (sd-scripts writes `.bin` pickles for plain `diffusers`; we never write pickled
weights into a folder, and diffusers loads either). `write_pipeline_folder` saves every component of
a pipeline as `from_pretrained` reads it, with floating-point weights cast to the save precision.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from library.atomic_io import atomic_write, ensure_writable_dir, replace_folder_atomically
from library.models.weights_io import cast_tensor

SAVE_MODEL_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors")
DIFFUSERS_FORMATS = ("diffusers", "diffusers_safetensors")


def extension_for(save_as: str) -> str:
    """The file extension of a save in this format ("" for a folder)."""
    return {"safetensors": ".safetensors", "ckpt": ".ckpt"}.get(save_as, "")


def family_format(save_as: str) -> str:
    """What a family's `save_full_model` is asked for: "safetensors" (also the tensors of a ckpt) or "diffusers"."""
    return "diffusers" if save_as in DIFFUSERS_FORMATS else "safetensors"


def save_ckpt(write_safetensors: Callable[[str], None], path: str, epoch: int, global_step: int) -> None:
    """sd-scripts' .ckpt of the tensors `write_safetensors(temp_path)` writes, written atomically."""
    import torch
    from safetensors.torch import load_file

    folder = os.path.dirname(os.path.abspath(path))
    ensure_writable_dir(folder)
    with tempfile.TemporaryDirectory(prefix=".ckpt.", dir=folder) as temp:
        tensors_path = os.path.join(temp, "model.safetensors")
        write_safetensors(tensors_path)
        checkpoint = {"state_dict": load_file(tensors_path), "epoch": int(epoch), "global_step": int(global_step)}
        atomic_write(path, lambda temp_path: torch.save(checkpoint, temp_path))


def write_pipeline_folder(folder: str, pipeline, dtype=None) -> None:
    """Every component of a diffusers pipeline as `from_pretrained` reads it, weights as safetensors."""
    from diffusers import ModelMixin
    from safetensors.torch import save_file
    from transformers import PreTrainedModel

    pipeline.save_config(folder)  # model_index.json
    for name, component in pipeline.components.items():
        if component is None:
            continue
        target = os.path.join(folder, name)
        if isinstance(component, ModelMixin):
            component.save_config(target)
            weights = {k: cast_tensor(v, dtype).contiguous() for k, v in component.state_dict().items()}
            save_file(weights, os.path.join(target, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        elif isinstance(component, PreTrainedModel):
            component.save_pretrained(target, state_dict={k: cast_tensor(v, dtype) for k, v in component.state_dict().items()})
        else:  # tokenizers, schedulers
            component.save_pretrained(target)


def save_pipeline_folder(pipeline, path: str, dtype=None) -> None:
    """A complete diffusers folder written aside and swapped in; the old folder survives any failure."""
    replace_folder_atomically(path, lambda folder: write_pipeline_folder(folder, pipeline, dtype))
