"""tools/generate.py on the tiny models of every family.

A LoRA must change the image exactly as diffusers' own pipeline does when diffusers fuses the same
LoRA file (`load_lora_weights` + `fuse_lora`, a loader we did not write) and samples with the same
scheduler and seed; without LoRAs the tool and diffusers give the same image. Img2img at strength 0
runs no denoising step and returns the VAE's reconstruction of the input: decode(mean of
encode(image)), compared with that computed by diffusers' VAE directly (to one 8-bit level, the PNG
rounding). Every bad input is one UserError (exit code 2 from the command line).
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from library.errors import UserError
from tools.generate import generate

SIZE = 64
STEPS = 2


def pixels(path_or_image):
    image = Image.open(path_or_image) if isinstance(path_or_image, str) else path_or_image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(ours, reference, levels=1):
    difference = np.abs(pixels(ours) - pixels(reference))
    assert difference.max() <= levels, f"images differ by up to {difference.max()} levels"


def random_lora(family_name, folder, path, seed, extra_args=(), conv_dim=None):
    """A LoRA on every module our training would give LoRA to, all weights random (non-zero)."""
    from library.families import get_family
    from library.tools_common import parse_tool_args
    from networks.lora import create_network
    from tools.generate import build_parser

    family = get_family(family_name)
    args = parse_tool_args(family, build_parser(family),
                           ["--pretrained_model_name_or_path", folder, "--prompt", "x", "--outdir", "o", *extra_args])
    args.mixed_precision = "no"
    components = family.load(args)
    network_args = {"conv_dim": str(conv_dim), "conv_alpha": "2"} if conv_dim else None
    network = create_network(family.lora_targets(components), network_dim=4, network_alpha=2,
                             network_args=network_args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in network.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    network.save_weights(str(path), None, {})
    return str(path)


def reference_image(pipe, prompt, seed, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt=prompt, width=SIZE, height=SIZE, num_inference_steps=STEPS, generator=generator,
                **kwargs).images[0]


def tool(folder, outdir, *extra, family="sd"):
    return generate(["--family", family, "--pretrained_model_name_or_path", folder, "--outdir", str(outdir),
                     "--W", str(SIZE), "--H", str(SIZE), "--steps", str(STEPS), *extra])


# ---- SD 1.x: two LoRAs in two layouts, ratios, sweep, img2img ----------------------------------------

@pytest.fixture(scope="module")
def sd_loras(tiny_sd15_folder, tmp_path_factory):
    from library.families import get_family
    from library.lora_formats import convert_lora_file

    root = tmp_path_factory.mktemp("sd_loras")
    first = random_lora("sd", tiny_sd15_folder, root / "first.safetensors", seed=1, conv_dim=2)
    second = random_lora("sd", tiny_sd15_folder, root / "second.safetensors", seed=2)
    second_comfy = str(root / "second_comfy.safetensors")
    convert_lora_file(second, second_comfy, "comfy", get_family("sd"))
    return first, second, second_comfy


def sd_reference_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    from library.families import get_family

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    family = get_family("sd")
    from library.families.base import ModelComponents

    training_schedule = ModelComponents(None, None, [], [], noise_scheduler=family_noise_scheduler(family, folder))
    pipe.scheduler = family.sampling_scheduler(training_schedule, "euler")
    return pipe


def family_noise_scheduler(family, folder):
    from library.tools_common import parse_tool_args
    from tools.generate import build_parser

    args = parse_tool_args(family, build_parser(family), ["--pretrained_model_name_or_path", folder, "--prompt", "x",
                                                          "--outdir", "o"])
    args.mixed_precision = "no"
    return family.load(args).noise_scheduler


def test_sd_two_loras_in_two_layouts_match_diffusers_fused_weights(tiny_sd15_folder, sd_loras, tmp_path):
    first, second, second_comfy = sd_loras
    plain = tool(tiny_sd15_folder, tmp_path / "plain", "--prompt", "a red cat", "--seed", "5", "--sampler", "euler")
    with_loras = tool(tiny_sd15_folder, tmp_path / "lora", "--prompt", "a red cat", "--seed", "5", "--sampler", "euler",
                      "--loras", first, second_comfy, "--ratios", "0.8", "0.5")
    pipe = sd_reference_pipeline(tiny_sd15_folder)
    assert_same_image(plain[0], reference_image(pipe, "a red cat", 5))
    pipe.load_lora_weights(first, adapter_name="first")
    pipe.load_lora_weights(second, adapter_name="second")
    pipe.set_adapters(["first", "second"], adapter_weights=[0.8, 0.5])
    pipe.fuse_lora(adapter_names=["first", "second"])
    assert_same_image(with_loras[0], reference_image(pipe, "a red cat", 5))
    assert np.abs(pixels(plain[0]) - pixels(with_loras[0])).max() > 10  # the LoRAs change the picture
    text = Image.open(with_loras[0]).text["parameters"]
    assert text.splitlines()[0] == "a red cat" and "Seed: 5" in text and "Lora: first:0.8, second_comfy:0.5" in text


# ---- SDXL, FLUX, SD3, Lumina 2: one kohya LoRA against diffusers' loader -----------------------------

def save_tiny(family_name, folder):
    from library.tiny_models import flux, lumina, sd3, sdxl

    savers = {"sdxl": sdxl.save_tiny_sdxl_pipeline, "flux": flux.save_tiny_flux_pipeline,
              "sd3": sd3.save_tiny_sd3_pipeline, "lumina": lumina.save_tiny_lumina_pipeline}
    return savers[family_name](folder)


def loaded_family(family_name, folder):
    from library.families import get_family
    from library.tools_common import parse_tool_args
    from tools.generate import build_parser

    family = get_family(family_name)
    args = parse_tool_args(family, build_parser(family), ["--pretrained_model_name_or_path", folder, "--prompt", "x",
                                                          "--outdir", "o"])
    args.mixed_precision = "no"
    return family, args, family.load(args)


@pytest.mark.parametrize("family_name, reference_layout, unet_only", [
    ("sdxl", "kohya", False), ("flux", "diffusers", False), ("sd3", "diffusers", False), ("lumina", "diffusers", True),
])
def test_lora_matches_diffusers_fused_weights(family_name, reference_layout, unet_only, tmp_path):
    from diffusers import DiffusionPipeline

    from library.lora_formats import convert_lora_file
    from library.training.sampling import SamplePrompt

    folder = save_tiny(family_name, str(tmp_path / "model"))
    family, args, components = loaded_family(family_name, folder)
    lora = random_lora_on(family, components, tmp_path / "lora.safetensors", seed=3, unet_only=unet_only)
    reference_lora = str(tmp_path / "reference_lora.safetensors")
    convert_lora_file(lora, reference_lora, reference_layout, family)

    plain = tool(folder, tmp_path / "plain", "--prompt", "a red cat", "--seed", "7", "--scale", "4",
                 "--sampler", "euler", family=family_name)
    with_lora = tool(folder, tmp_path / "lora", "--prompt", "a red cat", "--seed", "7", "--scale", "4",
                     "--sampler", "euler", "--loras", lora, "--ratios", "0.7", family=family_name)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = family.sampling_scheduler(components, "euler")
    kwargs = family.sample_pipeline_kwargs(SamplePrompt("a red cat", scale=4.0), args)
    assert_same_image(plain[0], reference_image(pipe, "a red cat", 7, **kwargs))
    pipe.load_lora_weights(reference_lora)
    pipe.fuse_lora(components=pipe._lora_loadable_modules, lora_scale=0.7)  # FLUX fuses only the transformer by default
    assert_same_image(with_lora[0], reference_image(pipe, "a red cat", 7, **kwargs))
    assert np.abs(pixels(plain[0]) - pixels(with_lora[0])).max() > 10


def random_lora_on(family, components, path, seed, unet_only=False):
    from networks.lora import create_network

    network = create_network(family.lora_targets(components), network_dim=4, network_alpha=2,
                             train_text_encoder=not unet_only)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in network.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    network.save_weights(str(path), None, {})
    return str(path)
