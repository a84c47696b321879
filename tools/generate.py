"""Generate images with a model and any number of LoRAs: txt2img, img2img and LoRA strength sweeps.

    python tools/generate.py --family sdxl --pretrained_model_name_or_path model.safetensors \
        --loras my_lora.safetensors other.safetensors --ratios 0.8 0.5 --prompt "ohwx, a cat" --outdir out
    python tools/generate.py --family flux --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --loras my_lora.safetensors --from_file prompts.txt --ratios_sweep 0,0.5,1 --outdir out
    python tools/generate.py ... --image_path photo.png --strength 0.6        (img2img)

Owns the after-training check of a LoRA. The model loads exactly as for training (the family's model
flags: single files, diffusers folders, FLUX/SD3 component files); images come from the family's
diffusers pipeline (`family.build_pipeline`, the one training samples with), img2img from diffusers'
image-to-image pipeline built from the same components. LoRAs in any of our layouts are fused into
the weights in memory (library/lora_fuse.py). Prompts come from `--prompt` or `--from_file` in
sd-scripts' sample-prompt format (`--n --w --h --d --s --l --g --ss` per line, or .toml/.json);
the flags `--W --H --steps --scale --seed --sampler --negative_prompt` are the defaults of every
prompt. Each PNG carries its generation parameters (seed included) in A1111's `parameters` text
chunk. `--ratios_sweep` renders every prompt at each LoRA strength and writes a contact sheet
(rows: prompts, columns: strengths).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError  # noqa: E402
from library.tools_common import run_tool  # noqa: E402

if TYPE_CHECKING:
    from library.lora_fuse import FusedLoras

logger = logging.getLogger("generate")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    from library.training.sampling import SAMPLER_NAMES

    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", default=None,
                       help='prompt text; sd-scripts\' per-prompt options may follow it ("a cat --n blurry --d 3")')
    group.add_argument("--from_file", default=None, metavar="FILE",
                       help="prompt file in sd-scripts' sample-prompt format (.txt one prompt per line, .toml, .json)")
    group.add_argument("--outdir", required=True, help="folder the images are written to")
    group.add_argument("--W", type=int, default=None, help="width (default 512, or the image's with --image_path)")
    group.add_argument("--H", type=int, default=None, help="height (default 512, or the image's with --image_path)")
    group.add_argument("--steps", type=int, default=None, help="sampling steps (default: the family's sample default)")
    group.add_argument("--scale", type=float, default=None, help="classifier-free guidance scale (a prompt's --l)")
    group.add_argument("--negative_prompt", default=None, help="negative prompt (a prompt's --n)")
    group.add_argument("--seed", type=int, default=None,
                       help="seed of the first image; the next images count up from it (default: random)")
    group.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, metavar="NAME",
                       help=f"sampler of DDPM models: {', '.join(SAMPLER_NAMES)} (default ddim; a prompt's --ss)")
    group.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt (default 1)")
    group.add_argument("--image_path", default=None, help="img2img: the starting image, resized to --W x --H")
    group.add_argument("--strength", type=float, default=0.8,
                       help="img2img: how much of the image is repainted, 0 (a VAE round trip) to 1 (default 0.8)")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--loras", nargs="+", default=[], metavar="FILE",
                      help="LoRA files (kohya, diffusers/PEFT or ComfyUI layout)")
    lora.add_argument("--ratios", nargs="+", type=float, default=None, metavar="R",
                      help="one strength per LoRA (default 1.0 each)")
    lora.add_argument("--ratios_sweep", default=None, metavar="S,S,...",
                      help="render every prompt at each of these strengths (multiplying --ratios) and write a "
                           "contact sheet, e.g. 0,0.5,1")

    run = parser.add_argument_group("device and memory")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                     help="weight dtype (default: bf16 on a GPU, no = float32 on the CPU)")
    run.add_argument("--cpu_offload", action="store_true",
                     help="keep each model part in CPU memory until the pipeline needs it (diffusers' "
                          "enable_model_cpu_offload)")


def build_parser(family) -> argparse.ArgumentParser:
    from library.config.weight_storage_args import add_weight_storage_arguments
    from library.tools_common import add_family_arguments

    parser = argparse.ArgumentParser(description=f"Generate images with a {family.display_name} model and LoRAs.")
    add_family_arguments(parser)
    family.add_arguments(parser)
    add_weight_storage_arguments(parser)
    add_generation_arguments(parser)
    parser.add_argument("--config_file", default=None, help="TOML file holding any of these arguments")
    return parser


# ---- checking the flags ----------------------------------------------------------------------------

def parse_sweep(text: Optional[str]) -> list[float]:
    if text is None:
        return [1.0]
    try:
        strengths = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--ratios_sweep {text}: give comma-separated numbers, e.g. 0,0.5,1") from None
    if not strengths:
        raise UserError("--ratios_sweep: give at least one strength, e.g. 0,0.5,1")
    return strengths


def check_args(family, args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.from_file is None):
        raise UserError("give the prompts with --prompt TEXT or --from_file FILE (one of them)")
    if args.ratios_sweep is not None and not args.loras:
        raise UserError("--ratios_sweep varies the strength of --loras: give at least one LoRA file")
    if args.cpu_offload and family.settings.blocks_to_swap:
        raise UserError("--cpu_offload and --blocks_to_swap both move weights between CPU and GPU; use one of them")
    if args.ratios_sweep is not None and family.settings.blocks_to_swap:
        raise UserError("--ratios_sweep changes weights that --blocks_to_swap keeps copies of; sweep without "
                        "--blocks_to_swap, or run one --ratios per command")
    if args.ratios_sweep is not None and (family.denoiser_storage or family.text_encoder_storage):
        raise UserError("--ratios_sweep changes weights that --fp8_base/--base_weights_dtype store quantized; sweep "
                        "without them, or run one --ratios per command")
    if args.ratios is not None and len(args.ratios) != len(args.loras):
        raise UserError(f"--ratios has {len(args.ratios)} values for {len(args.loras)} --loras; give one per LoRA")
    for flag in ("W", "H", "steps", "images_per_prompt"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1 (got {value})")
    if not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength must be between 0 and 1 (got {args.strength})")
    if args.image_path is not None and not os.path.isfile(args.image_path):
        raise UserError(f"--image_path {args.image_path}: no such file")
    for path in args.loras:
        if not os.path.isfile(path):
            raise UserError(f"--loras {path}: no such file")


def load_prompts(args: argparse.Namespace) -> list:
    """The prompts with the command line's defaults filled in where a prompt sets nothing."""
    from library.training.sampling import load_sample_prompts, parse_prompt_line

    prompts = ([parse_prompt_line(args.prompt.strip(), "--prompt")] if args.prompt is not None
               else load_sample_prompts(args.from_file))
    if not prompts[0].prompt:
        raise UserError("--prompt: the prompt text is empty")
    defaults = {"negative_prompt": args.negative_prompt, "width": args.W, "height": args.H,
                "sample_steps": args.steps, "scale": args.scale, "sample_sampler": args.sampler}
    return [replace(p, **{k: v for k, v in defaults.items() if getattr(p, k) is None and v is not None})
            for p in prompts]


# ---- model ----------------------------------------------------------------------------------------

def choose_device(args: argparse.Namespace):
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if device.type == "cuda" else "no"
    return device


def place_components(family, components, args, device, dtype) -> None:
    """Everything on the device (the denoiser and text encoders the family's way: block swap, fp8/int8/nf4
    storage), or left in CPU memory for diffusers' model CPU offload."""
    from library.devices import move_module

    target = "cpu" if args.cpu_offload else device
    move_module(components.vae, target, dtype)
    for index in range(len(components.text_encoders)):
        family.place_text_encoder(components, index, target, dtype)
    family.place_denoiser(components, target, dtype)


def load_model(family, args, device, strengths: list[float]):
    from library.lora_fuse import FusedLoras
    from library.lora_merge import load_loras
    from library.devices import torch_dtype

    dtype = torch_dtype(args.mixed_precision)
    components = family.load(args)
    for module in [components.denoiser, components.vae, *components.text_encoders]:
        module.requires_grad_(False)
        module.eval()
    fused = None
    if args.loras:
        loras = load_loras(args.loras, args.ratios, family)
        fused = FusedLoras(family, components, loras, args.pretrained_model_name_or_path,
                           keep_originals=len(strengths) > 1)
        fused.set_strength(min(strengths))  # before placing: block swap keeps its own copy of the weights
        logger.info("%d LoRAs touch %d layers", len(loras), fused.layer_count)
    place_components(family, components, args, device, dtype)
    return components, fused


# ---- images ---------------------------------------------------------------------------------------

@dataclass
class Job:
    """One image to make: a prompt, its seed and the LoRA strength."""

    prompt: object  # SamplePrompt
    seed: int
    strength: float
    number: int  # image number of this prompt (0 .. images_per_prompt-1)


def plan_jobs(prompts: list, strengths: list[float], images_per_prompt: int, seed: Optional[int]) -> list[Job]:
    """Seeds: a prompt's --d, else --seed counting up per image, else random; the same seed at every strength."""
    import random

    rng = random.Random()
    jobs, counter = [], 0
    for prompt in prompts:
        for number in range(images_per_prompt):
            if prompt.seed is not None:
                image_seed = prompt.seed + number
            elif seed is not None:
                image_seed = seed + counter
            else:
                image_seed = rng.randrange(2**32)
            counter += 1
            jobs += [Job(prompt, image_seed, strength, number) for strength in strengths]
    return jobs


def lora_note(args: argparse.Namespace, strength: float) -> str:
    ratios = args.ratios or [1.0] * len(args.loras)
    return ", ".join(f"{os.path.splitext(os.path.basename(path))[0]}:{strength * ratio:g}"
                     for path, ratio in zip(args.loras, ratios))


def parameters_text(job: Job, family, args, size: tuple[int, int], scheduler: str) -> str:
    """A1111's `parameters` PNG text: the prompt, the negative prompt, then `Key: value` pairs."""
    prompt = job.prompt
    lines = [prompt.prompt]
    if prompt.negative_prompt:
        lines.append(f"Negative prompt: {prompt.negative_prompt}")
    values = [("Steps", prompt.sample_steps or family.sample_default_steps),
              ("Sampler", scheduler), ("CFG scale", prompt.scale),
              ("Guidance", prompt.guidance_scale), ("Seed", job.seed), ("Size", f"{size[0]}x{size[1]}"),
              ("Model", os.path.basename(os.path.normpath(args.pretrained_model_name_or_path)))]
    if args.loras:
        values.append(("Lora", lora_note(args, job.strength)))
    if args.image_path:
        values += [("Init image", os.path.basename(args.image_path)), ("Denoising strength", args.strength)]
    lines.append(", ".join(f"{key}: {value}" for key, value in values if value is not None))
    return "\n".join(lines)


def output_path(outdir: str, job: Job, sweep: bool) -> str:
    """sd-scripts' gen_img names (`im_<time>_<prompt>_<image>_<seed>.png`), a strength tag in a sweep;
    never the name of an existing file."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    tag = f"_s{job.strength:g}" if sweep else ""
    stem = f"im_{stamp}_{job.prompt.index:03d}_{job.number:02d}_{job.seed}{tag}"
    path, extra = os.path.join(outdir, stem + ".png"), 1
    while os.path.exists(path):
        path, extra = os.path.join(outdir, f"{stem}-{extra}.png"), extra + 1
    return path


def save_png_with_parameters(image, path: str, parameters: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    from library.atomic_io import atomic_write

    info = PngInfo()
    info.add_text("parameters", parameters)
    atomic_write(path, lambda temp: image.save(temp, format="PNG", pnginfo=info))


class Generator:
    """Builds the pipelines over the loaded components and renders jobs."""

    def __init__(self, family, components, args, device, init_image) -> None:
        self.family, self.components, self.args, self.device = family, components, args, device
        self.init_image = init_image
        if init_image is not None:
            self.pipeline(None)  # a family without an img2img pipeline fails here, before any image

    def warn_unused_options(self, prompts: list) -> None:
        for prompt in prompts:
            unused = self.family.unused_sample_options(prompt, self.components)
            if unused:
                logger.warning("prompt %d: %s has no effect for %s", prompt.index, ", ".join(unused),
                               self.family.display_name)

    def pipeline(self, sampler: Optional[str]):
        scheduler = self.family.sampling_scheduler(self.components, sampler or self.args.sample_sampler)
        pipeline = self.family.build_pipeline(self.components, scheduler)
        if self.init_image is not None:
            pipeline = self.family.image_to_image_pipeline(pipeline)
        if self.args.cpu_offload:
            pipeline.enable_model_cpu_offload(device=self.device)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def render(self, job: Job):
        from library.training.sampling import run_pipeline, sample_size, vae_round_trip

        size = sample_size(self.family, job.prompt, default=self.default_size())
        pipeline = self.pipeline(job.prompt.sample_sampler)
        if self.init_image is not None and self.args.strength == 0:
            return vae_round_trip(pipeline, self.init_image.resize(size)), size, "none (VAE round trip)"
        extra = {} if self.init_image is None else {"image": self.init_image.resize(size), "strength": self.args.strength}
        image = run_pipeline(self.family, pipeline, job.prompt, job.seed, self.args, self.components, size, **extra)
        return image, size, type(pipeline.scheduler).__name__

    def default_size(self) -> tuple[int, int]:
        return self.init_image.size if self.init_image is not None else (512, 512)


def check_img2img_steps(prompts: list, family, strength: float) -> None:
    """Img2img runs int(steps * strength) steps; strength 0 is a VAE round trip, else at least one step."""
    for prompt in prompts:
        steps = prompt.sample_steps or family.sample_default_steps
        if 0 < strength and int(steps * strength) < 1:
            raise UserError(f"--strength {strength:g} with {steps} steps runs no denoising step; raise --strength "
                            f"or --steps (or use --strength 0 for the VAE round trip)")


def render_all(family, fused: Optional["FusedLoras"], generator: Generator, jobs: list[Job], strengths: list[float],
               args) -> dict:
    """Render and save every job (fusing each LoRA strength once); returns {job key: (path, image)}."""
    import torch
    from tqdm.auto import tqdm

    results, current = {}, min(strengths)  # load_model fused the smallest strength
    with torch.no_grad():
        for job in tqdm(sorted(jobs, key=lambda job: job.strength), desc="generating", unit="img"):
            if fused is not None and job.strength != current:
                fused.set_strength(job.strength)
                current = job.strength
            image, size, scheduler = generator.render(job)
            path = output_path(args.outdir, job, sweep=args.ratios_sweep is not None)
            save_png_with_parameters(image, path, parameters_text(job, family, args, size, scheduler))
            results[(job.prompt.index, job.number, job.strength)] = (path, image)
    return results


def write_sweep_sheet(results: dict, strengths: list[float], outdir: str) -> str:
    """One row per prompt and image, one column per strength."""
    from library.training.sampling import contact_sheet, save_png_atomic

    keys = sorted(results, key=lambda key: (key[0], key[1], strengths.index(key[2])))
    labels = [f"#{index} s={strength:g}" for index, _, strength in keys]
    sheet = os.path.join(outdir, f"sweep_{time.strftime('%Y%m%d%H%M%S')}_contact_sheet.png")
    save_png_atomic(contact_sheet([results[key][1] for key in keys], labels, columns=len(strengths)), sheet)
    return sheet


def generate(argv: list[str]) -> list[str]:
    """Parse the flags, render every image; returns the paths written (images, then contact sheet)."""
    from library.atomic_io import ensure_writable_dir
    from library.data.images import load_image
    from library.families import get_family
    from library.tools_common import choose_family_name, parse_tool_args

    family = get_family(choose_family_name(argv))
    family, args = parse_tool_args(family, build_parser(family), argv)
    check_args(family, args)
    strengths = parse_sweep(args.ratios_sweep)
    prompts = load_prompts(args)
    init_image = load_image(args.image_path).convert("RGB") if args.image_path else None
    if init_image is not None:
        check_img2img_steps(prompts, family, args.strength)
    ensure_writable_dir(args.outdir)
    device = choose_device(args)
    components, fused = load_model(family, args, device, strengths)
    generator = Generator(family, components, args, device, init_image)
    generator.warn_unused_options(prompts)
    jobs = plan_jobs(prompts, strengths, args.images_per_prompt, args.seed)
    results = render_all(family, fused, generator, jobs, strengths, args)
    paths = [path for path, _ in results.values()]
    if args.ratios_sweep is not None:
        paths.append(write_sweep_sheet(results, strengths, args.outdir))
    logger.info("wrote %d images to %s", len(jobs), args.outdir)
    return paths


if __name__ == "__main__":
    run_tool(generate)
