"""Aspect-ratio bucketing: which training size each image gets, how it is resized and cropped to it.

Our own code (no maintained library does sd-scripts-compatible bucketing); it reproduces
sd-scripts' rules so a dataset trains at the same sizes as there:
- predefined buckets: for every width from min_bucket_reso to max_bucket_reso in bucket_reso_steps,
  the tallest multiple of the step whose area fits the resolution's area (capped at max), plus the
  transposes and the largest square; an image goes to the bucket with the nearest aspect ratio
  (its own size if that is a bucket);
- bucket_no_upscale: each image gets its own bucket, never larger than the image (shrunk to the
  resolution's area first if it is larger), sides rounded down to the step. min/max_bucket_reso do
  not apply in this mode, as in sd-scripts. An image smaller than one step on a side is the one
  exception: that side becomes one step (sd-scripts would make an empty bucket);
- images are resized to cover their bucket (keeping the aspect ratio) and cropped to it, centred
  or at a random offset with random_crop.
"""

from __future__ import annotations

import logging
import math
import random

from library.errors import UserError

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)


def make_bucket_resolutions(resolution_wh: Size, min_reso: int, max_reso: int, reso_steps: int) -> list[Size]:
    """sd-scripts' predefined bucket list, sorted: area <= resolution area, sides multiples of the step."""
    max_area = resolution_wh[0] * resolution_wh[1]
    square = math.isqrt(max_area) // reso_steps * reso_steps
    buckets = {(square, square)}
    for width in range(min_reso, max_reso + 1, reso_steps):
        height = min(max_reso, max_area // width // reso_steps * reso_steps)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def resized_size_for_bucket(image_wh: Size, bucket_wh: Size) -> Size:
    """The size an image is resized to so that it covers the bucket, keeping its aspect ratio.

    The side that fits exactly is the one the bucket is relatively longer in; the other is rounded
    to the nearest pixel (sd-scripts' arithmetic), never below the bucket.
    """
    image_w, image_h = image_wh
    bucket_w, bucket_h = bucket_wh
    if image_w / image_h > bucket_w / bucket_h:  # image is wider than the bucket: match heights
        scale = bucket_h / image_h
    else:
        scale = bucket_w / image_w
    resized_w = int(image_w * scale + 0.5)
    resized_h = int(image_h * scale + 0.5)
    return max(resized_w, bucket_w), max(resized_h, bucket_h)


def crop_offset(resized_wh: Size, bucket_wh: Size, random_crop: bool, rng: random.Random) -> Size:
    """(left, top) of the bucket-sized crop in the resized image: centred, or uniform with random_crop."""
    spare_w = resized_wh[0] - bucket_wh[0]
    spare_h = resized_wh[1] - bucket_wh[1]
    if spare_w < 0 or spare_h < 0:
        raise ValueError(f"resized image {resized_wh} is smaller than its bucket {bucket_wh}")
    if random_crop:
        return rng.randint(0, spare_w), rng.randint(0, spare_h)
    return spare_w // 2, spare_h // 2


class BucketManager:
    """Assigns a training size to each image for one dataset (one resolution)."""

    def __init__(
        self,
        resolution_wh: Size,
        enable_bucket: bool,
        min_reso: int,
        max_reso: int,
        reso_steps: int,
        no_upscale: bool,
    ) -> None:
        width, height = resolution_wh
        if width <= 0 or height <= 0:
            raise UserError(f"resolution must be positive, got {width}x{height}")
        self.resolution = (int(width), int(height))
        self.enable_bucket = enable_bucket
        self.no_upscale = enable_bucket and no_upscale
        self.reso_steps = reso_steps
        self.max_area = width * height
        self._buckets: list[Size] = [self.resolution]
        self.min_reso = self.max_reso = None  # bucket range; unused without bucketing
        if enable_bucket:
            self.min_reso, self.max_reso = _checked_bucket_range(self.resolution, min_reso, max_reso, reso_steps)
            if self.no_upscale:
                self._buckets = []
            else:
                self._buckets = make_bucket_resolutions(self.resolution, self.min_reso, self.max_reso, reso_steps)
                self._aspect_ratios = [w / h for w, h in self._buckets]

    @property
    def buckets(self) -> list[Size]:
        """The predefined buckets, sorted; empty with bucket_no_upscale (each image has its own)."""
        return list(self._buckets)

    def bucket_for(self, image_wh: Size) -> Size:
        """The (width, height) this image trains at."""
        if not self.enable_bucket:
            return self.resolution
        if self.no_upscale:
            return self._no_upscale_sizes(image_wh)[0]
        return self._nearest_predefined(image_wh)

    def resized_size_for(self, image_wh: Size) -> Size:
        """The size this image is resized to before cropping to `bucket_for(image_wh)`.

        Equal to `resized_size_for_bucket(image, bucket)`, except with bucket_no_upscale: there an
        image within the resolution's area is not resized at all (only cropped), like sd-scripts.
        """
        if self.no_upscale:
            return self._no_upscale_sizes(image_wh)[1]
        return resized_size_for_bucket(image_wh, self.bucket_for(image_wh))

    def _nearest_predefined(self, image_wh: Size) -> Size:
        image_wh = (int(image_wh[0]), int(image_wh[1]))
        if image_wh in self._buckets:
            return image_wh
        aspect = image_wh[0] / image_wh[1]
        errors = [abs(bucket_aspect - aspect) for bucket_aspect in self._aspect_ratios]
        return self._buckets[errors.index(min(errors))]  # ties go to the first (smallest) bucket

    def _round_to_steps(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.reso_steps

    def _no_upscale_sizes(self, image_wh: Size) -> tuple[Size, Size]:
        """(bucket, resized size) for bucket_no_upscale."""
        image_w, image_h = image_wh
        if image_w * image_h > self.max_area:
            resized = self._shrink_to_max_area(image_w / image_h)
        else:
            resized = (image_w, image_h)
        bucket = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
        if bucket[0] == 0 or bucket[1] == 0:
            bucket = (max(bucket[0], self.reso_steps), max(bucket[1], self.reso_steps))
            resized = resized_size_for_bucket(image_wh, bucket)
        return bucket, resized

    def _shrink_to_max_area(self, aspect: float) -> Size:
        """Resized size of an image larger than max_area: one side a step multiple, aspect kept best."""
        target_w = math.sqrt(self.max_area * aspect)
        target_h = self.max_area / target_w
        # Either round the width to steps and derive the height, or the other way round; keep the
        # choice whose step-rounded bucket has the smaller aspect-ratio error.
        width_first = self._round_to_steps(target_w)
        width_first_error = _aspect_error(width_first, self._round_to_steps(width_first / aspect), aspect)
        height_first = self._round_to_steps(target_h)
        height_first_error = _aspect_error(self._round_to_steps(height_first * aspect), height_first, aspect)
        if width_first_error < height_first_error:
            return width_first, int(width_first / aspect + 0.5)
        return int(height_first * aspect + 0.5), height_first


def _aspect_error(width: int, height: int, aspect: float) -> float:
    if width == 0 or height == 0:
        return math.inf
    return abs(width / height - aspect)


def _checked_bucket_range(resolution: Size, min_reso: int, max_reso: int, reso_steps: int) -> Size:
    """min/max_bucket_reso moved to multiples of the step (down/up, as sd-scripts), then validated."""
    if not isinstance(reso_steps, int) or reso_steps <= 0:
        raise UserError(f"bucket_reso_steps must be a positive integer, got {reso_steps!r}")
    adjusted_min = min_reso - min_reso % reso_steps
    adjusted_max = max_reso + (-max_reso) % reso_steps
    if (adjusted_min, adjusted_max) != (min_reso, max_reso):
        logger.warning(
            "min_bucket_reso/max_bucket_reso %d/%d adjusted to %d/%d, multiples of bucket_reso_steps %d",
            min_reso, max_reso, adjusted_min, adjusted_max, reso_steps,
        )
    if adjusted_min <= 0:
        raise UserError(f"min_bucket_reso must be at least bucket_reso_steps ({reso_steps}), got {min_reso}")
    if min(resolution) < adjusted_min:
        raise UserError(
            f"min_bucket_reso ({adjusted_min}) is larger than the shorter side of resolution "
            f"{resolution[0]}x{resolution[1]}: lower min_bucket_reso or raise resolution"
        )
    if max(resolution) > adjusted_max:
        raise UserError(
            f"max_bucket_reso ({adjusted_max}) is smaller than the longer side of resolution "
            f"{resolution[0]}x{resolution[1]}: raise max_bucket_reso or lower resolution"
        )
    return adjusted_min, adjusted_max

