"""Finding the images of each subset and what is known about each before training: `ImageEntry`.

Owns the scan of DreamBooth subsets (an image folder, captions in `<stem><caption_extension>`
files, class_tokens or folder names) and fine-tuning subsets (a metadata JSON file mapping images to
captions and tags, sd-scripts' format), reading each image's size from its header, assigning its
bucket, its loss-mask file (`conditioning_data_dir`), and sd-scripts' balancing of regularisation
images against the training images. An image that cannot be read or whose caption file is not UTF-8
is reported by path and skipped. The metadata's `train_resolution` (sd-scripts' pre-bucketed npz
latents) is not used: sizes come from the image headers and buckets from the dataset options.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Optional

from library.config.dataset_spec import SubsetSpec
from library.data.buckets import BucketManager
from library.data.captions import CaptionFileError, caption_from_path, is_path_skipped, read_caption_file
from library.data.images import IMAGE_EXTENSIONS, CropPlan, ImageLoadError, is_image_file, plan_crop, read_image_size
from library.data.loss_masks import find_mask, missing_masks_error
from library.errors import UserError

logger = logging.getLogger(__name__)

MAX_PATHS_IN_WARNING = 5


@dataclass
class ImageEntry:
    """One image of one subset: its caption text (before the per-step pipeline), size and bucket."""

    image_path: str
    caption: str
    subset: SubsetSpec
    dataset_index: int
    image_size_wh: tuple[int, int]  # after EXIF rotation
    bucket_wh: tuple[int, int]
    resized_wh: tuple[int, int]  # size before cropping to the bucket
    is_reg: bool
    num_repeats: int  # subset.num_repeats, or what regularisation balancing made of it
    mask_path: Optional[str] = None  # the loss mask image (conditioning_data_dir)

    def center_crop(self) -> CropPlan:
        """The deterministic resize and crop without random_crop: what cached latents were made from."""
        return plan_crop(self.image_size_wh, self.bucket_wh, False, random.Random(0), self.resized_wh)


class SkipReport:
    """Collects skipped images, warns about each by path and logs one summary."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def skip(self, path: str, reason: str) -> None:
        logger.warning("skipping %s: %s", path, reason)
        self.skipped.append((path, reason))

    def log_summary(self) -> None:
        if self.skipped:
            logger.warning("skipped %d images that could not be used (see the warnings above)", len(self.skipped))


def _warn_some(message: str, paths: list[str]) -> None:
    shown = ", ".join(paths[:MAX_PATHS_IN_WARNING]) + (", ..." if len(paths) > MAX_PATHS_IN_WARNING else "")
    logger.warning("%s: %s", message, shown)


def subset_label(subset: SubsetSpec) -> str:
    return subset.image_dir if subset.is_dreambooth else subset.metadata_file


def list_image_files(image_dir: str, recursive: bool) -> list[str]:
    """Image files (by extension, hidden files excluded) in image_dir, sorted; below it if recursive."""
    found = []
    for folder, subfolders, names in os.walk(image_dir):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")) if recursive else []
        found.extend(os.path.join(folder, name) for name in sorted(names)
                     if not name.startswith(".") and is_image_file(name))
    return found


class SubsetScanner:
    """Builds the ImageEntry list of subsets of one dataset (one BucketManager)."""

    def __init__(self, dataset_index: int, buckets: BucketManager, report: SkipReport) -> None:
        self.dataset_index = dataset_index
        self.buckets = buckets
        self.report = report

    def scan(self, subset: SubsetSpec) -> list[ImageEntry]:
        if subset.is_dreambooth:
            entries = self._scan_dreambooth(subset)
        else:
            entries = self._scan_metadata(subset)
        if not entries:
            logger.warning("no usable images in %s", subset_label(subset))
        if subset.conditioning_data_dir is not None:
            self._attach_masks(entries, subset)
        return entries

    @staticmethod
    def _attach_masks(entries: list[ImageEntry], subset: SubsetSpec) -> None:
        missing = []
        for entry in entries:
            entry.mask_path = find_mask(entry.image_path, subset.image_dir, subset.conditioning_data_dir)
            if entry.mask_path is None:
                missing.append(entry.image_path)
        if missing:
            raise missing_masks_error(subset.conditioning_data_dir, missing)

    def _entry(self, path: str, caption: str, subset: SubsetSpec) -> Optional[ImageEntry]:
        try:
            size = read_image_size(path, verify=True)
        except ImageLoadError as e:
            self.report.skip(path, e.reason)
            return None
        return ImageEntry(
            image_path=path, caption=caption, subset=subset, dataset_index=self.dataset_index,
            image_size_wh=size, bucket_wh=self.buckets.bucket_for(size),
            resized_wh=self.buckets.resized_size_for(size), is_reg=subset.is_reg,
            num_repeats=subset.num_repeats,
        )

    def _scan_dreambooth(self, subset: SubsetSpec) -> list[ImageEntry]:
        image_dir = subset.image_dir
        if not os.path.isdir(image_dir):
            raise UserError(f"image_dir {image_dir} does not exist or is not a folder: fix the path in the dataset config")
        entries, uncaptioned, class_captioned = [], [], []
        for path in list_image_files(image_dir, recursive=subset.caption_from_path):
            if subset.caption_from_path and is_path_skipped(path, image_dir):
                continue  # below a `__` folder: excluded by the user
            try:
                caption, from_class_tokens = self._dreambooth_caption(path, subset)
            except CaptionFileError as e:
                self.report.skip(path, str(e))
                continue
            if caption is None:
                uncaptioned.append(path)
                caption = ""
            elif from_class_tokens:
                class_captioned.append(path)
            entry = self._entry(path, caption, subset)
            if entry is not None:
                entries.append(entry)
        if class_captioned:
            _warn_some(f"{len(class_captioned)} images in {image_dir} have no caption file ({subset.caption_extension}):"
                       f" they train with the class tokens `{subset.class_tokens}`", class_captioned)
        if uncaptioned:
            _warn_some(f"{len(uncaptioned)} images in {image_dir} have no caption file ({subset.caption_extension}) "
                       "and the subset has no class_tokens: they train with an empty caption", uncaptioned)
        return entries

    @staticmethod
    def _dreambooth_caption(path: str, subset: SubsetSpec) -> tuple[Optional[str], bool]:
        """(caption, whether it is the class tokens): caption file, else folder names
        (caption_from_path), else class_tokens; (None, False) if none."""
        caption_path = os.path.splitext(path)[0] + subset.caption_extension
        caption = read_caption_file(caption_path, all_lines=subset.captions.enable_wildcard)
        if caption:
            return caption, False
        if subset.caption_from_path:
            from_path = caption_from_path(path, subset.image_dir)
            if from_path:
                return from_path, False
        return subset.class_tokens, subset.class_tokens is not None

    def _scan_metadata(self, subset: SubsetSpec) -> list[ImageEntry]:
        metadata = _read_metadata_file(subset.metadata_file)
        entries = []
        for image_key, record in metadata.items():
            path = _find_metadata_image(image_key, subset.image_dir)
            if path is None:
                where = f" in {subset.image_dir}" if subset.image_dir else ""
                self.report.skip(image_key, f"listed in {subset.metadata_file} but no such image found{where}")
                continue
            if not isinstance(record, dict):
                self.report.skip(path, f"its entry in {subset.metadata_file} is not an object")
                continue
            caption = _metadata_caption(record, subset)
            if caption is None:
                self.report.skip(path, f"its caption/tags in {subset.metadata_file} are not text")
                continue
            entry = self._entry(path, caption, subset)
            if entry is not None:
                entries.append(entry)
        return entries


def _read_metadata_file(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            metadata = json.load(f)
    except FileNotFoundError:
        raise UserError(f"metadata_file {path} does not exist: fix the path in the dataset config") from None
    except UnicodeDecodeError:
        raise UserError(f"metadata_file {path} is not UTF-8 text: save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"metadata_file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(metadata, dict):
        raise UserError(f"metadata_file {path} must hold a JSON object mapping images to {{\"caption\": ...}}")
    return metadata


def _find_metadata_image(image_key: str, image_dir: Optional[str]) -> Optional[str]:
    """The image a metadata key names: a path as is, or a name (with or without extension) in image_dir."""
    candidates = [image_key]
    if image_dir:
        base = os.path.join(image_dir, image_key)
        candidates += [base] + [base + ext for ext in IMAGE_EXTENSIONS] + [base + ext.upper() for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        if os.path.isfile(candidate) and is_image_file(candidate):
            return candidate
    return None


def _metadata_caption(record: dict, subset: SubsetSpec) -> Optional[str]:
    """sd-scripts: the caption, with the tags appended after caption_separator; tags alone if no caption."""
    caption, tags = record.get("caption"), record.get("tags")
    if caption is None:
        caption, tags = tags, None
    if caption is None:
        return ""
    if not isinstance(caption, str) or (tags is not None and not isinstance(tags, str)):
        return None
    separator = subset.captions.caption_separator
    if subset.captions.enable_wildcard:
        if tags:
            tags = tags.replace("\n", separator)
            lines = [line for line in caption.split("\n") if line.strip()]
            caption = "\n".join(f"{line}{separator}{tags}" for line in lines)
    elif tags:
        caption = caption + separator + tags
    return caption


def balance_regularization(entries: list[ImageEntry]) -> list[ImageEntry]:
    """The entries of one dataset with regularisation images repeated or trimmed as sd-scripts does.

    Regularisation images (each with its subset's num_repeats) are taken in order until they add up
    to the number of training samples per epoch; if they fall short, further passes add one repeat
    to each in turn. Images beyond that number are left out.
    """
    train = [entry for entry in entries if not entry.is_reg]
    regs = [entry for entry in entries if entry.is_reg]
    target = sum(entry.num_repeats for entry in train)
    for entry in regs:
        entry.num_repeats = entry.subset.num_repeats
    kept: list[ImageEntry] = []
    count = 0
    first_pass = True
    while regs and count < target:
        for entry in regs:
            if first_pass:
                kept.append(entry)
                count += entry.num_repeats
            else:
                entry.num_repeats += 1
                count += 1
            if count >= target:
                break
        first_pass = False
    if regs and len(kept) < len(regs):
        logger.info("using %d of %d regularisation images (as many as the training samples need)", len(kept), len(regs))
    return train + kept
