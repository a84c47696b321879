"""The dataset page's files: images with their caption files, caption edits, and the dataset TOML.

Images are found like the trainer finds them (library/data/image_entries.py); a caption is the
first caption line of `<stem><caption_extension>` next to the image, read with the trainer's own
reader. Edits are written atomically. `dataset_toml` writes sd-scripts' schema ([general],
[[datasets]], [[datasets.subsets]]) that `--dataset_config` reads, and checks it by loading it
with the trainer's loader and bucket rules, so the UI never writes a file the CLI would reject.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from library.atomic_io import write_text_atomic
from library.errors import UserError

CAPTION_EXTENSIONS = (".caption", ".txt")


@dataclass
class DatasetSettings:
    image_dir: str
    caption_extension: str = ".caption"
    num_repeats: int = 1
    trigger_word: str = ""
    resolution: int = 512
    batch_size: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024


@dataclass
class ImageCaption:
    image: str
    caption: str | None  # None: no caption file yet


def check_image_dir(image_dir: str) -> str:
    folder = os.path.abspath(os.path.expanduser(image_dir.strip()))
    if not image_dir.strip() or not os.path.isdir(folder):
        raise UserError(f"image folder {image_dir!r} does not exist; enter the folder that holds the images")
    return folder


def guess_caption_extension(image_dir: str) -> str:
    """The extension most caption files in the folder have (.caption, the trainer's default, if none)."""
    names = os.listdir(image_dir) if os.path.isdir(image_dir) else []
    counts = {ext: sum(name.endswith(ext) for name in names) for ext in CAPTION_EXTENSIONS}
    return max(CAPTION_EXTENSIONS, key=lambda ext: (counts[ext], ext == ".caption"))


def caption_path(image: str, caption_extension: str) -> str:
    return os.path.splitext(image)[0] + caption_extension


def list_images(image_dir: str, caption_extension: str) -> list[ImageCaption]:
    from library.data.captions import read_caption_file
    from library.data.image_entries import list_image_files

    folder = check_image_dir(image_dir)
    return [ImageCaption(image, read_caption_file(caption_path(image, caption_extension)))
            for image in list_image_files(folder, recursive=False)]


def write_caption(image: str, caption_extension: str, caption: str) -> str:
    """Replace the caption of `image` (atomic write); returns the caption file."""
    if not os.path.isfile(image):
        raise UserError(f"{image}: no such image; reload the folder")
    text = " ".join(caption.split())  # one line: the trainer reads the first caption line only
    path = caption_path(image, caption_extension)
    write_text_atomic(path, text + "\n")
    return path


def dataset_document(settings: DatasetSettings) -> dict:
    subset = {"image_dir": check_image_dir(settings.image_dir), "num_repeats": int(settings.num_repeats)}
    if settings.trigger_word.strip():
        subset["trigger_word"] = settings.trigger_word.strip()
    dataset = {"resolution": int(settings.resolution), "batch_size": int(settings.batch_size),
               "enable_bucket": bool(settings.enable_bucket), "subsets": [subset]}
    if settings.enable_bucket:
        dataset.update(min_bucket_reso=int(settings.min_bucket_reso), max_bucket_reso=int(settings.max_bucket_reso))
    return {"general": {"caption_extension": settings.caption_extension}, "datasets": [dataset]}


def write_dataset_toml(settings: DatasetSettings, path: str) -> str:
    """Write the dataset TOML for `settings` to `path`, check it with the trainer's loader; returns its text."""
    import argparse

    import toml

    from library.config.dataset_config import load_dataset_group

    from library.data.buckets import BucketManager

    text = toml.dumps(dataset_document(settings))
    write_text_atomic(path, text)
    group = load_dataset_group(argparse.Namespace(dataset_config=path))  # raises UserError naming the key
    for dataset in group.datasets:
        try:  # the trainer's bucket checks (resolution within min/max_bucket_reso)
            BucketManager(dataset.resolution, dataset.enable_bucket, dataset.min_bucket_reso, dataset.max_bucket_reso,
                          dataset.bucket_reso_steps, dataset.bucket_no_upscale)
        except UserError as error:
            raise UserError(f"{path}: {error}") from None
    return text
