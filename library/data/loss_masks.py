"""Loss masks from mask images (`--masked_loss` with `conditioning_data_dir`, sd-scripts' masked loss).

A subset with `conditioning_data_dir` has one mask image per training image, with the same file name
(any image extension; below the image folder, the same relative path). As in sd-scripts, the mask's
red channel is the per-pixel loss weight (255 = full loss, 0 = none). The mask rides on the image as
its alpha channel, so it is resized, cropped and flipped exactly like the pixels and reaches the loss
where `alpha_mask` masks do (library/training/losses.py: area-resized to the latent size, multiplied
into the elementwise loss); a mask image takes the place of the image's own alpha. A mask whose size
differs from its image's is first stretched to the image's size. Latent cache files record the mask
file (name, size, modification time), so a changed mask makes them stale.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from library.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image, resize_image
from library.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from library.config.dataset_spec import DatasetGroupSpec
    from library.data.image_entries import ImageEntry

MAX_LISTED = 5


def find_mask(image_path: str, image_dir: Optional[str], conditioning_dir: str) -> Optional[str]:
    """The mask file of an image: same relative path and stem in `conditioning_dir`, any image extension."""
    relative = os.path.relpath(image_path, image_dir) if image_dir else os.path.basename(image_path)
    stem = os.path.join(conditioning_dir, os.path.splitext(relative)[0])
    for extension in IMAGE_EXTENSIONS:
        for candidate in (stem + extension, stem + extension.upper()):
            if os.path.isfile(candidate):
                return candidate
    return None


def missing_masks_error(conditioning_dir: str, image_paths: list[str]) -> UserError:
    shown = ", ".join(os.path.basename(path) for path in image_paths[:MAX_LISTED])
    more = ", ..." if len(image_paths) > MAX_LISTED else ""
    return UserError(f"conditioning_data_dir {conditioning_dir} has no mask for {len(image_paths)} images "
                     f"({shown}{more}): add a mask image with the same file name for each, or remove the images")


def load_entry_image(entry: "ImageEntry") -> "Image.Image":
    """The entry's image as training uses it: RGB, or RGBA whose alpha is the loss mask."""
    image = load_image(entry.image_path)
    if entry.mask_path is None:
        return image
    try:
        mask = load_image(entry.mask_path).getchannel("R")
    except ImageLoadError as e:
        raise ImageLoadError(entry.image_path, f"its loss mask cannot be read: {e.reason} ({entry.mask_path})") from e
    mask = resize_image(mask, image.size)
    image = image.convert("RGB")
    image.putalpha(mask)
    return image


def mask_identity(entry: "ImageEntry") -> dict[str, str]:
    """What a latent cache file records of the entry's mask file (empty without one)."""
    if entry.mask_path is None:
        return {}
    stat = os.stat(entry.mask_path)
    return {"mask_file": f"{os.path.basename(entry.mask_path)}:{stat.st_size}:{stat.st_mtime_ns}"}


def check_masked_loss(spec: "DatasetGroupSpec", masked_loss: bool) -> None:
    """--masked_loss needs masks, and mask folders need --masked_loss (as in sd-scripts)."""
    subsets = [subset for dataset in spec.datasets for subset in dataset.subsets]
    with_folder = [subset for subset in subsets if subset.conditioning_data_dir is not None]
    if with_folder and not masked_loss:
        raise UserError(f"{spec.source}: conditioning_data_dir ({with_folder[0].conditioning_data_dir}) holds loss "
                        "masks, which need --masked_loss: add the flag (ControlNet training is not supported)")
    if masked_loss and not any(subset.uses_loss_mask for subset in subsets):
        raise UserError(f"--masked_loss needs masks: set conditioning_data_dir (a folder of mask images named like "
                        f"the training images) or alpha_mask = true in {spec.source}, or drop --masked_loss")
