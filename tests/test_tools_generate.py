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


def random_lora(family_name, folder, path, seed, conv_dim=None):
    """A LoRA on every module our training would give LoRA to, all weights random (non-zero)."""
    family, _, components = loaded_family(family_name, folder)
    return random_lora_on(family, components, path, seed, conv_dim=conv_dim)


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

    family, _, components = loaded_family("sd", folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = family.sampling_scheduler(components, "euler")
    return pipe


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

    family, args = parse_tool_args(get_family(family_name), build_parser(get_family(family_name)),
                                   ["--pretrained_model_name_or_path", folder, "--prompt", "x", "--outdir", "o"])
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
    kwargs = family.sample_pipeline_kwargs(SamplePrompt("a red cat", scale=4.0), args, components)
    assert_same_image(plain[0], reference_image(pipe, "a red cat", 7, **kwargs))
    pipe.load_lora_weights(reference_lora)
    pipe.fuse_lora(components=pipe._lora_loadable_modules, lora_scale=0.7)  # FLUX fuses only the transformer by default
    assert_same_image(with_lora[0], reference_image(pipe, "a red cat", 7, **kwargs))
    assert np.abs(pixels(plain[0]) - pixels(with_lora[0])).max() > 10


def random_lora_on(family, components, path, seed, unet_only=False, conv_dim=None):
    from networks.lora import create_network

    network_args = {"conv_dim": str(conv_dim), "conv_alpha": "2"} if conv_dim else None
    network = create_network(family.lora_targets(components), network_dim=4, network_alpha=2,
                             network_args=network_args, train_text_encoder=not unet_only)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in network.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    network.save_weights(str(path), None, {})
    return str(path)


# ---- img2img, sweep, memory options, prompt files -----------------------------------------------------

def test_img2img_strength_zero_is_the_vae_round_trip_and_strength_changes_it(tiny_sd15_folder, tmp_path):
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    source = tmp_path / "photo.png"
    values = np.random.default_rng(0).integers(0, 256, (80, 72, 3), dtype=np.uint8)
    Image.fromarray(values).save(source)
    kept = tool(tiny_sd15_folder, tmp_path / "zero", "--prompt", "a cat", "--seed", "1",
                "--image_path", str(source), "--strength", "0")
    vae = AutoencoderKL.from_pretrained(tiny_sd15_folder, subfolder="vae")
    processor = VaeImageProcessor(vae_scale_factor=8)
    with torch.no_grad():
        latents = vae.encode(processor.preprocess(Image.open(source).convert("RGB").resize((SIZE, SIZE)))).latent_dist.mode()
        expected = processor.postprocess(vae.decode(latents).sample, output_type="pil")[0]
    assert_same_image(kept[0], expected)
    repainted = tool(tiny_sd15_folder, tmp_path / "half", "--prompt", "a cat", "--seed", "1",
                     "--image_path", str(source), "--strength", "1", "--steps", "2")
    assert Image.open(repainted[0]).size == (SIZE, SIZE)
    assert np.abs(pixels(repainted[0]) - pixels(kept[0])).max() > 10
    text = Image.open(repainted[0]).text["parameters"]
    assert "Denoising strength: 1.0" in text and "Sampler: DDIMScheduler" in text
    assert "Sampler: none (VAE round trip)" in Image.open(kept[0]).text["parameters"]


def test_sweep_writes_every_strength_and_a_contact_sheet(tiny_sd15_folder, sd_loras, tmp_path):
    first, _, _ = sd_loras
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red cat --d 11\na blue dog --n blurry --d 12 --l 5\n")
    paths = tool(tiny_sd15_folder, tmp_path / "out", "--from_file", str(prompts), "--loras", first,
                 "--ratios", "0.5", "--ratios_sweep", "0,1", "--sampler", "euler")
    images, sheet = paths[:-1], paths[-1]
    assert len(images) == 4 and sheet.endswith("_contact_sheet.png")
    assert Image.open(sheet).size == (2 * SIZE, 2 * (SIZE + 14))  # columns: strengths, rows: prompts
    texts = {os.path.basename(p): Image.open(p).text["parameters"] for p in images}
    zero = [name for name in texts if name.endswith("_s0.png")]
    assert len(zero) == 2 and all("Lora: first:0" in texts[name] for name in zero)
    dog = next(name for name in texts if "_001_00_12_s1.png" in name)
    assert texts[dog].splitlines()[:2] == ["a blue dog", "Negative prompt: blurry"]
    assert "CFG scale: 5.0" in texts[dog] and "Seed: 12" in texts[dog] and "Lora: first:0.5" in texts[dog]
    # strength 0 of the sweep is the model without the LoRA, and strength 1 the LoRA at its ratio
    plain = tool(tiny_sd15_folder, tmp_path / "plain", "--prompt", "a red cat --d 11", "--sampler", "euler")
    at_one = tool(tiny_sd15_folder, tmp_path / "one", "--prompt", "a red cat --d 11", "--sampler", "euler",
                  "--loras", first, "--ratios", "0.5")
    cat = {name[-6:]: path for name, path in zip(texts, images) if "_000_00_11_" in name}
    assert_same_image(cat["s0.png"], plain[0], levels=0)
    assert_same_image(cat["s1.png"], at_one[0], levels=0)


def test_cpu_offload_gives_the_same_image(tiny_sd15_folder, tmp_path):
    plain = tool(tiny_sd15_folder, tmp_path / "a", "--prompt", "a cat", "--seed", "4", "--device", "cpu")
    offloaded = tool(tiny_sd15_folder, tmp_path / "b", "--prompt", "a cat", "--seed", "4", "--device", "cpu",
                     "--cpu_offload")
    assert_same_image(offloaded[0], plain[0], levels=0)


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    ([], "give the prompts with --prompt TEXT or --from_file FILE"),
    (["--prompt", "a", "--ratios_sweep", "0,1"], "--ratios_sweep varies the strength of --loras"),
    (["--prompt", "a", "--loras", "missing.safetensors"], "--loras missing.safetensors: no such file"),
    (["--prompt", "a", "--ratios", "0.5"], "--ratios has 1 values for 0 --loras"),
    (["--prompt", "a", "--strength", "1.5", "--image_path", "x.png"], "--strength must be between 0 and 1"),
    (["--prompt", "a", "--image_path", "missing.png"], "--image_path missing.png: no such file"),
    (["--prompt", "a --q 3"], "unknown prompt option --q"),
    (["--prompt", "a", "--W", "0"], "--W must be at least 1"),
])
def test_bad_flags(tiny_sd15_folder, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        generate(["--pretrained_model_name_or_path", tiny_sd15_folder, "--outdir", str(tmp_path), *extra])


def test_bad_inputs_after_loading(tiny_sd15_folder, sd_loras, tmp_path):
    source = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "red").save(source)
    with pytest.raises(UserError, match="runs no denoising step"):
        tool(tiny_sd15_folder, tmp_path, "--prompt", "a", "--image_path", str(source), "--strength", "0.2")
    sdxl_lora = tmp_path / "not_sd.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 4)}, str(sdxl_lora))
    with pytest.raises(UserError, match="not_sd.safetensors"):
        tool(tiny_sd15_folder, tmp_path, "--prompt", "a", "--loras", str(sdxl_lora))
    result = run_script("tools/generate.py", "--pretrained_model_name_or_path", tiny_sd15_folder, "--outdir",
                        str(tmp_path), "--prompt", "a", "--loras", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: --loras {tmp_path / 'missing.safetensors'}: no such file"


def test_lumina_img2img_from_the_txt2img_pipeline(tmp_path):
    """diffusers has no Lumina 2 img2img: ours at strength 1 is txt2img of the same seed (the same
    noise, the full schedule), at 0.5 it keeps more of the image than at 1."""
    folder = save_tiny("lumina", str(tmp_path / "lumina"))
    source = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    common = ("--prompt", "a cat", "--seed", "3", "--steps", "4")
    txt2img = tool(folder, tmp_path / "t", *common, family="lumina")
    full = tool(folder, tmp_path / "full", *common, "--image_path", str(source), "--strength", "1", family="lumina")
    half = tool(folder, tmp_path / "half", *common, "--image_path", str(source), "--strength", "0.5", family="lumina")
    zero = tool(folder, tmp_path / "zero", *common, "--image_path", str(source), "--strength", "0", family="lumina")
    assert_same_image(full[0], txt2img[0], levels=0)
    distance = {name: np.abs(pixels(path[0]) - pixels(zero[0])).mean() for name, path in (("half", half), ("full", full))}
    assert 0 < distance["half"] < distance["full"]


def test_cpu_block_swap_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("block swap runs on this machine")
    with pytest.raises(UserError, match="blocks_to_swap"):
        generate(["--family", "flux", "--pretrained_model_name_or_path", str(tmp_path), "--outdir", str(tmp_path),
                  "--prompt", "a", "--blocks_to_swap", "1"])


@pytest.mark.parametrize("extra, message", [
    (["--cpu_offload"], "--cpu_offload and --blocks_to_swap both move weights"),
    (["--loras", __file__, "--ratios_sweep", "0,1"], "--ratios_sweep changes weights that --blocks_to_swap keeps"),
])
def test_block_swap_conflicts(extra, message):
    from types import SimpleNamespace

    from tools.generate import add_generation_arguments, check_args

    parser = __import__("argparse").ArgumentParser()
    add_generation_arguments(parser)
    args = parser.parse_args(["--prompt", "a", "--outdir", "o", *extra])
    swapping = SimpleNamespace(settings=SimpleNamespace(blocks_to_swap=4))
    with pytest.raises(UserError, match=message):
        check_args(swapping, args)
