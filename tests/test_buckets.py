"""Aspect-ratio buckets, resize and crop sizes: exact values from sd-scripts' rules."""

from __future__ import annotations

import logging
import random

import pytest

from library.data.buckets import BucketManager, crop_offset, make_bucket_resolutions, resized_size_for_bucket
from library.errors import UserError

SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def manager(no_upscale=False, resolution=(512, 512), min_reso=256, max_reso=1024, steps=64, enable=True):
    return BucketManager(resolution, enable, min_reso, max_reso, steps, no_upscale)


# ---------------------------------------------------------------- predefined bucket lists


def test_bucket_list_512_steps_64():
    assert manager().buckets == SD15_BUCKETS
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD15_BUCKETS


def test_bucket_list_sdxl_1024():
    buckets = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(buckets) == 41
    for bucket in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (640, 1536)]:
        assert bucket in buckets
    assert buckets[0] == (256, 2048) and buckets[-1] == (2048, 512)
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


def test_bucket_list_non_square_resolution():
    # area 768*512; the square is the largest multiple of 64 not above sqrt(area) = 627
    assert make_bucket_resolutions((768, 512), 256, 1024, 64) == [
        (256, 1024), (320, 1024), (384, 896), (384, 960), (384, 1024), (448, 832), (512, 704), (512, 768),
        (576, 576), (576, 640), (640, 576), (704, 512), (768, 512), (832, 448), (896, 384), (960, 384),
        (1024, 256), (1024, 320), (1024, 384),
    ]


# ---------------------------------------------------------------- choosing a bucket


@pytest.mark.parametrize(
    "image, bucket",
    [
        ((1000, 600), (640, 384)),  # ar 1.667: exactly 640/384
        ((800, 600), (576, 448)),  # ar 1.333: 1.286 beats 1.667
        ((600, 800), (448, 576)),
        ((1024, 1024), (512, 512)),
        ((1, 1), (512, 512)),
        ((576, 448), (576, 448)),  # an image already at a bucket size keeps it
        ((3000, 500), (1024, 256)),  # ar 6: the widest bucket
        ((500, 3000), (256, 1024)),
        ((700, 300), (768, 320)),  # ar 2.333: 2.4 (768x320) is nearer than 2.2 (704x320)
    ],
)
def test_nearest_aspect_ratio_bucket(image, bucket):
    assert manager().bucket_for(image) == bucket


def test_nearest_aspect_is_really_nearest():
    m = manager()
    for image in [(640, 480), (1920, 1080), (1080, 1920), (900, 1000), (333, 777)]:
        chosen = m.bucket_for(image)
        errors = [abs(w / h - image[0] / image[1]) for w, h in m.buckets]
        assert abs(chosen[0] / chosen[1] - image[0] / image[1]) == min(errors)


def test_without_bucketing_every_image_gets_the_resolution():
    m = manager(enable=False, resolution=(512, 768), min_reso=9999, steps=0)  # bucket settings are unused
    assert m.buckets == [(512, 768)]
    assert m.bucket_for((1000, 600)) == (512, 768)
    assert m.resized_size_for((1000, 600)) == (1280, 768)


# ---------------------------------------------------------------- bucket_no_upscale


@pytest.mark.parametrize(
    "image, bucket, resized",
    [
        ((300, 200), (256, 192), (300, 200)),  # small: not resized, only cropped
        ((512, 512), (512, 512), (512, 512)),
        ((1000, 600), (640, 384), (640, 384)),  # larger than 512*512: shrunk to that area first
        ((1200, 700), (640, 384), (658, 384)),
        ((700, 1200), (384, 640), (384, 658)),
        ((2000, 100), (1984, 64), (2000, 100)),  # area below the cap: min/max_bucket_reso do not apply
        ((40, 30), (64, 64), (85, 64)),  # smaller than one step: the only upscale
    ],
)
def test_no_upscale_buckets(image, bucket, resized):
    m = manager(no_upscale=True)
    assert m.bucket_for(image) == bucket
    assert m.resized_size_for(image) == resized
    assert m.buckets == []


def test_no_upscale_never_larger_than_image_or_area():
    m = manager(no_upscale=True)
    rng = random.Random(0)
    for _ in range(2000):
        image = (rng.randint(64, 3000), rng.randint(64, 3000))
        w, h = m.bucket_for(image)
        rw, rh = m.resized_size_for(image)
        assert w % 64 == 0 and h % 64 == 0
        assert w <= image[0] and h <= image[1] and w * h <= 512 * 512
        assert w <= rw <= image[0] and h <= rh <= image[1]


# ---------------------------------------------------------------- resize and crop


@pytest.mark.parametrize(
    "image, bucket, resized",
    [
        ((800, 600), (576, 448), (597, 448)),  # wider than bucket: heights match, 800*448/600 = 597.3
        ((600, 800), (448, 576), (448, 597)),
        ((1000, 600), (640, 384), (640, 384)),
        ((300, 300), (512, 512), (512, 512)),  # upscaled
        ((1001, 333), (1024, 256), (1024, 341)),  # narrower than bucket: widths match, 333*1024/1001 = 340.7
        ((1920, 1080), (704, 320), (704, 396)),
    ],
)
def test_resized_size_for_bucket(image, bucket, resized):
    assert resized_size_for_bucket(image, bucket) == resized


def test_resized_size_always_covers_bucket():
    rng = random.Random(1)
    for _ in range(5000):
        image = (rng.randint(1, 5000), rng.randint(1, 5000))
        bucket = rng.choice(SD15_BUCKETS)
        w, h = resized_size_for_bucket(image, bucket)
        assert (w == bucket[0] and h >= bucket[1]) or (h == bucket[1] and w >= bucket[0])


def test_crop_offset_center():
    assert crop_offset((597, 448), (576, 448), False, random.Random(0)) == (10, 0)
    assert crop_offset((448, 597), (448, 576), False, random.Random(0)) == (0, 10)
    assert crop_offset((512, 512), (512, 512), False, random.Random(0)) == (0, 0)


def test_crop_offset_random():
    reference = random.Random(4)
    expected = (reference.randint(0, 100), reference.randint(0, 20))
    assert crop_offset((676, 468), (576, 448), True, random.Random(4)) == expected
    rng = random.Random(0)
    offsets = {crop_offset((580, 450), (576, 448), True, rng) for _ in range(300)}
    assert offsets == {(x, y) for x in range(5) for y in range(3)}


def test_crop_offset_rejects_an_image_smaller_than_its_bucket():
    with pytest.raises(ValueError, match="smaller than its bucket"):
        crop_offset((500, 448), (576, 448), False, random.Random(0))


# ---------------------------------------------------------------- settings errors


def test_min_bucket_reso_above_resolution_is_a_user_error():
    with pytest.raises(UserError, match=r"min_bucket_reso \(640\) is larger than the shorter side of resolution 512x768"):
        manager(resolution=(512, 768), min_reso=640)


def test_max_bucket_reso_below_resolution_is_a_user_error():
    with pytest.raises(UserError, match=r"max_bucket_reso \(512\) is smaller than the longer side of resolution 512x768"):
        manager(resolution=(512, 768), max_reso=512)


@pytest.mark.parametrize("steps", [0, -64])
def test_bad_reso_steps_is_a_user_error(steps):
    with pytest.raises(UserError, match="bucket_reso_steps must be a positive integer"):
        manager(steps=steps)


def test_bad_resolution_is_a_user_error():
    with pytest.raises(UserError, match="resolution must be positive"):
        manager(resolution=(0, 512))


def test_min_max_moved_to_step_multiples_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="library.data.buckets"):
        m = manager(min_reso=300, max_reso=1000)
    assert (m.min_reso, m.max_reso) == (256, 1024)
    assert m.buckets == SD15_BUCKETS
    assert "adjusted to 256/1024" in caplog.text
