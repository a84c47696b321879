"""Caption every image under a folder with a local vision-language model, one caption file per image.

    python tools/caption_images.py train_images --model florence-community/Florence-2-large \
        [--task more_detailed_caption] [--trigger_word ohwx] [--caption_extension .txt] [--overwrite]
    python tools/caption_images.py train_images --model Salesforce/blip-image-captioning-large

Owns the captioning step before training. The model is what transformers itself loads (never
`trust_remote_code`): Florence-2 (`model_type` florence2, e.g. florence-community/Florence-2-base or
-large, running a caption task prompt) and BLIP (`model_type` blip, e.g.
Salesforce/blip-image-captioning-base or -large). `--model` is a local folder or a hub id; with
HF_HUB_OFFLINE=1 a hub id comes from the local Hugging Face cache only. The kind of model is read from
its config.json. Images are found recursively (`--no-recursive` keeps to the top folder); a caption is
written next to its image as `<stem><caption_extension>`, atomically. Existing caption files are kept
(and counted) unless `--overwrite`; unreadable images are reported and skipped. Images are listed as
training lists them (library/data/image_entries.list_image_files: hidden files and folders left out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError  # noqa: E402
from library.tools_common import run_tool  # noqa: E402

logger = logging.getLogger("caption_images")

DEFAULT_MODEL = "florence-community/Florence-2-large"
FLORENCE_TASKS = {"caption": "<CAPTION>", "detailed_caption": "<DETAILED_CAPTION>",
                  "more_detailed_caption": "<MORE_DETAILED_CAPTION>"}
DTYPES = ("bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a caption file next to every image of a folder.")
    parser.add_argument("image_dir", help="folder of images (searched recursively)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"local model folder or hub id of a Florence-2 or BLIP model (default: {DEFAULT_MODEL})")
    parser.add_argument("--task", choices=sorted(FLORENCE_TASKS), default="more_detailed_caption",
                        help="Florence-2 caption task: <CAPTION>, <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION> "
                             "(default: more_detailed_caption, a paragraph)")
    parser.add_argument("--caption_extension", default=".txt", help="extension of the caption files (default: .txt)")
    parser.add_argument("--prefix", default="", help="text put verbatim before every caption")
    parser.add_argument("--trigger_word", default=None, help='word put first in every caption, followed by ", "')
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing caption files (default: keep them and count them as kept)")
    parser.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                        help="also caption images in sub-folders (default: on; --no-recursive turns it off)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per model call (default: 1)")
    parser.add_argument("--num_beams", type=int, default=3, help="beam search width (default: 3; 1 = greedy)")
    parser.add_argument("--max_length", type=int, default=256, help="most tokens in a caption (default: 256)")
    parser.add_argument("--min_length", type=int, default=0, help="fewest tokens in a caption (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="model dtype (default: float16 on a GPU, float32 on the CPU)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not os.path.isdir(args.image_dir):
        raise UserError(f"image folder {args.image_dir} does not exist or is not a folder; give the folder of images")
    for flag in ("batch_size", "num_beams", "max_length"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if not args.caption_extension.startswith("."):
        raise UserError(f'--caption_extension must start with a dot, like ".txt" (got "{args.caption_extension}")')


# ---------------------------------------------------------------------------------------------- model


def resolve_model_folder(model: str) -> str:
    """A local folder, or the folder of a hub id's snapshot (from the local cache when offline)."""
    from library.models.hub_cache import cached_snapshot, hub_is_offline

    if os.path.isdir(model):
        return model
    if os.path.exists(model) or model.count("/") != 1:
        raise UserError(f"--model {model} is neither a model folder nor a hub id like org/name")
    fix = "download it once with the hub online, or pass --model a local folder"
    if hub_is_offline():
        return cached_snapshot(model, f"captioning model {model}", fix)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as e:  # network errors, missing repo, gated repo: all fixed by the user
        raise UserError(f"could not download captioning model {model}: {e}; {fix}") from e


def read_model_type(folder: str) -> str:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}; --model must be a transformers model folder") from e
    if "auto_map" in config:
        raise UserError(f"{folder} needs the model's own remote code, which this tool never runs; use a "
                        "transformers-native copy such as florence-community/Florence-2-large")
    model_type = config.get("model_type")
    if model_type not in CAPTIONERS:
        raise UserError(f"{path} has model_type {model_type!r}; caption_images.py runs "
                        f"{', '.join(sorted(CAPTIONERS))} models ({DEFAULT_MODEL}, Salesforce/blip-image-captioning-large)")
    return model_type


def choose_device_and_dtype(args: argparse.Namespace):
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    return device, getattr(torch, name)


class Captioner:
    """A transformers processor + generation model; caption(images) gives one text per image."""

    model_class = ""

    def __init__(self, folder: str, args: argparse.Namespace) -> None:
        import transformers

        self.device, self.dtype = choose_device_and_dtype(args)
        self.processor = transformers.AutoProcessor.from_pretrained(folder)
        model_class = getattr(transformers, self.model_class)
        self.model = model_class.from_pretrained(folder, dtype=self.dtype).to(self.device).eval()
        self.generate_kwargs = dict(max_new_tokens=args.max_length, min_new_tokens=args.min_length,
                                    num_beams=args.num_beams, do_sample=False)

    def inputs(self, images: list):
        raise NotImplementedError

    def caption(self, images: list) -> list[str]:
        import torch

        inputs = self.inputs(images).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.no_grad():
            ids = self.model.generate(**inputs, **self.generate_kwargs)
        return [clean_caption(text) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


class FlorenceCaptioner(Captioner):
    model_class = "Florence2ForConditionalGeneration"

    def __init__(self, folder: str, args: argparse.Namespace) -> None:
        super().__init__(folder, args)
        self.task = FLORENCE_TASKS[args.task]

    def inputs(self, images: list):
        return self.processor(text=[self.task] * len(images), images=images, return_tensors="pt")


class BlipCaptioner(Captioner):
    model_class = "BlipForConditionalGeneration"

    def inputs(self, images: list):
        return self.processor(images=images, return_tensors="pt")


CAPTIONERS = {"florence2": FlorenceCaptioner, "blip": BlipCaptioner}


def clean_caption(text: str) -> str:
    return " ".join(text.split())


def load_captioner(args: argparse.Namespace) -> Captioner:
    folder = resolve_model_folder(args.model)
    captioner = CAPTIONERS[read_model_type(folder)]
    logger.info("loading %s from %s", captioner.model_class, folder)
    return captioner(folder, args)


# --------------------------------------------------------------------------------------------- images


def caption_path(image_path: str, extension: str) -> str:
    return os.path.splitext(image_path)[0] + extension


def open_rgb(path: str):
    """The image in RGB; transparent parts become white (captioners read RGB only)."""
    from PIL import Image

    from library.data.images import load_image

    image = load_image(path)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image


def full_caption(text: str, args: argparse.Namespace) -> str:
    trigger = f"{args.trigger_word}, " if args.trigger_word else ""
    return f"{trigger}{args.prefix}{text}"


# ---------------------------------------------------------------------------------------------- run


@dataclass
class CaptionCounts:
    written: int = 0
    kept: int = 0
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"captioned {self.written} images, kept {self.kept} existing captions"
        if self.kept:
            text += " (--overwrite replaces them)"
        return text + f", skipped {len(self.unreadable)} unreadable images"


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def caption_batch(captioner: Captioner, paths: list[str], args: argparse.Namespace, counts: CaptionCounts) -> None:
    from library.atomic_io import write_text_atomic
    from library.data.images import ImageLoadError

    readable, images = [], []
    for path in paths:
        try:
            images.append(open_rgb(path))
            readable.append(path)
        except ImageLoadError as e:
            logger.warning("skipped: %s", e)
            counts.unreadable.append(path)
    if not images:
        return
    for path, text in zip(readable, captioner.caption(images)):
        write_text_atomic(caption_path(path, args.caption_extension), full_caption(text, args) + "\n")
        counts.written += 1


def caption_images(argv: list[str]) -> CaptionCounts:
    """Parse the flags, caption the images that need it; returns the counts."""
    from tqdm.auto import tqdm

    from library.data.image_entries import list_image_files

    args = build_parser().parse_args(argv)
    check_args(args)
    counts = CaptionCounts()
    todo = []
    for path in list_image_files(args.image_dir, args.recursive):
        if os.path.exists(caption_path(path, args.caption_extension)) and not args.overwrite:
            counts.kept += 1
        else:
            todo.append(path)
    if todo:
        captioner = load_captioner(args)
        with tqdm(total=len(todo), desc="captioning", unit="img") as progress:
            for paths in batches(todo, args.batch_size):
                caption_batch(captioner, paths, args, counts)
                progress.update(len(paths))
    elif not counts.kept:
        raise UserError(f"no images ({', '.join(image_extensions())}) found in {args.image_dir}"
                        + ("" if args.recursive else " (sub-folders not searched: --no-recursive)"))
    logger.info("%s", counts.summary())
    for path in counts.unreadable:
        logger.info("unreadable: %s", path)
    return counts


def image_extensions() -> tuple[str, ...]:
    from library.data.images import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


if __name__ == "__main__":
    run_tool(caption_images)
