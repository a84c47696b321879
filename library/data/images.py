"""Reading image files and turning one image into the training tensor for its bucket.

Owns the pixel side of a training example: which files count as images, opening them in any mode
(palette, grey with alpha, CMYK, 16-bit, bit maps) with their EXIF orientation applied, reading
their size cheaply from the header, and resizing + cropping + flipping + colour jitter to the
bucket size. Pillow does the decoding and resampling. Behaviour follows sd-scripts: images that
shrink on both sides are resized with an area (box) filter, others with Lanczos, unless the subset's
`resize_interpolation` names a filter (sd-scripts' names, mapped to Pillow's filter of that name:
nearest, bilinear/linear, bicubic/cubic, lanczos, area/box = box; sd-scripts runs some of these
through OpenCV, so pixels may differ slightly from its output); an RGBA image's
colour channels are used as they are (the alpha only becomes the loss mask with `alpha_mask`).
Any failure to read a file becomes `ImageLoadError` naming the path and the cause.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image, ImageOps

from library.data.buckets import crop_offset, resized_size_for_bucket
from library.errors import UserError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

EXIF_ORIENTATION_TAG = 0x0112
ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)  # transposed or rotated by 90/270 degrees
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MODES_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")

# color_aug, as sd-scripts: with probability 1/3 either a hue shift (half the time) or a gamma change.
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT_DEGREES = 16.0  # sd-scripts' 8 in OpenCV's 0..180 hue scale
GAMMA_RANGE = (0.95, 1.05)


class ImageLoadError(UserError):
    """An image file that cannot be read; datasets skip such files with a warning."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


def is_image_file(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _open_error(path: str, error: BaseException) -> ImageLoadError:
    if isinstance(error, Image.UnidentifiedImageError):
        empty = os.path.exists(path) and os.path.getsize(path) == 0
        reason = "the file is empty (0 bytes)" if empty else "not a readable image (corrupt or unsupported format)"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror  # missing file, permission denied, ...
    else:
        reason = str(error) or type(error).__name__  # e.g. "image file is truncated"
    return ImageLoadError(path, reason)


_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(path: str) -> Image.Image:
    """The fully decoded image, EXIF orientation applied, in mode "RGB" or (if it has alpha) "RGBA"."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # a decoded copy, rotated if the EXIF says so
            image.load()
    except _READ_ERRORS as e:
        raise _open_error(path, e) from e
    try:
        return to_rgb_or_rgba(image)
    except (ValueError, OSError) as e:
        raise ImageLoadError(path, f"cannot convert image mode {image.mode} to RGB: {e}") from e


def to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to "RGB", or "RGBA" when the image carries transparency."""
    mode = image.mode
    if mode in ("RGB", "RGBA"):
        return image
    if mode in SIXTEEN_BIT_MODES:
        # Pillow's own convert clips 16-bit values at 255 (a white image); scale to 8 bits instead.
        values = np.asarray(image).astype(np.float64)
        return _grey_array_to_rgb(values / 257.0)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0  # floats in 0..1 or already 0..255
        return _grey_array_to_rgb(values * scale)
    if mode in MODES_WITH_ALPHA or "transparency" in image.info:
        return image.convert("RGBA")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def _grey_array_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _header_orientation(image: Image.Image) -> int:
    # Pillow decodes a whole PNG to look for an eXIf chunk after the pixel data; such files are
    # rare, so only the EXIF found before the pixels counts here.
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(EXIF_ORIENTATION_TAG, 1)


def read_image_size(path: str, verify: bool = False) -> tuple[int, int]:
    """(width, height) as load_image will return it, from the header only (EXIF rotation applied).

    With `verify`, Pillow also checks the file's structure without decoding pixels (for PNG the
    chunk checksums), which catches most truncated or damaged files cheaply.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = _header_orientation(image)
            if verify:
                image.verify()
    except _READ_ERRORS as e:
        raise _open_error(path, e) from e
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"image has no pixels ({width}x{height})")
    if orientation in ORIENTATIONS_SWAPPING_SIDES:
        return height, width
    return width, height


@dataclass
class CropPlan:
    """Where the bucket-sized crop of a resized image lies (before any flip)."""

    resized_wh: tuple[int, int]
    left: int
    top: int

    def crop_top_left(self, bucket_wh: tuple[int, int], flipped: bool) -> tuple[int, int]:
        """(top, left) of the crop as seen in the training image; mirrored when the image is flipped."""
        if not flipped:
            return self.top, self.left
        return self.top, self.resized_wh[0] - self.left - bucket_wh[0]


def plan_crop(
    image_wh: tuple[int, int],
    bucket_wh: tuple[int, int],
    random_crop: bool,
    rng: random.Random,
    resized_wh: Optional[tuple[int, int]] = None,
) -> CropPlan:
    """Resized size (default: the smallest covering the bucket) and crop offset of one image."""
    if resized_wh is None:
        resized_wh = resized_size_for_bucket(image_wh, bucket_wh)
    left, top = crop_offset(resized_wh, bucket_wh, random_crop, rng)
    return CropPlan(resized_wh=tuple(resized_wh), left=left, top=top)


@dataclass
class PreparedImage:
    pixels: "torch.Tensor"  # [3, H, W] float32 in [-1, 1]
    alpha: Optional["torch.Tensor"]  # [1, H, W] float32 in [0, 1], None when the image has no alpha
    original_size_hw: tuple[int, int]
    crop_top_left: tuple[int, int]  # (top, left) in the resized image, mirrored when flipped


PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}


def resize_image(image: Image.Image, size_wh: tuple[int, int], interpolation: Optional[str] = None) -> Image.Image:
    """`image` at `size_wh` with the named filter (PIL_FILTERS), or by default box when it shrinks on
    both sides and Lanczos otherwise."""
    if image.size == tuple(size_wh):
        return image
    if interpolation is not None:
        resample = PIL_FILTERS[interpolation]
    else:
        shrinks_both_sides = image.width > size_wh[0] and image.height > size_wh[1]
        resample = Image.Resampling.BOX if shrinks_both_sides else Image.Resampling.LANCZOS
    return image.resize(tuple(size_wh), resample=resample)


def color_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' color_aug: 1 time in 3, a hue shift of up to 16 degrees or a gamma of 0.95-1.05."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return image
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT_LIMIT_DEGREES, HUE_SHIFT_LIMIT_DEGREES) / 360.0 * 256.0
        hsv = np.asarray(image.convert("HSV")).astype(np.float64)
        hsv[..., 0] = np.rint(hsv[..., 0] + shift) % 256
        return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")
    gamma = rng.uniform(*GAMMA_RANGE)
    values = (np.asarray(image).astype(np.float64) / 255.0) ** gamma
    return Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def prepare_image(
    image: Image.Image,
    bucket_wh: tuple[int, int],
    random_crop: bool,
    rng: random.Random,
    flip: bool,
    resized_wh: Optional[tuple[int, int]] = None,
    color_aug: bool = False,
    interpolation: Optional[str] = None,
) -> PreparedImage:
    """Resize to cover the bucket (or to `resized_wh`) with `interpolation` (see resize_image), crop to
    it, flip, jitter colours, to tensors.

    Random draws, in this order: the crop offset (random_crop), then color_aug.
    """
    import torch

    plan = plan_crop(image.size, bucket_wh, random_crop, rng, resized_wh)
    box = (plan.left, plan.top, plan.left + bucket_wh[0], plan.top + bucket_wh[1])
    # Colour and alpha are resized apart: Pillow resizes RGBA premultiplied, which would blacken
    # the colour of transparent pixels.
    rgb = resize_image(image.convert("RGB"), plan.resized_wh, interpolation).crop(box)
    alpha = None
    if image.mode == "RGBA":
        alpha = resize_image(image.getchannel("A"), plan.resized_wh, interpolation).crop(box)
    if flip:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        alpha = alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if alpha is not None else None
    if color_aug:
        rgb = color_augment(rgb, rng)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    alpha_tensor = None
    if alpha is not None:
        alpha_tensor = torch.from_numpy(np.asarray(alpha, dtype=np.float32))[None] / 255.0
    return PreparedImage(
        pixels=pixels.contiguous(),
        alpha=alpha_tensor,
        original_size_hw=(image.height, image.width),
        crop_top_left=plan.crop_top_left(bucket_wh, flip),
    )
