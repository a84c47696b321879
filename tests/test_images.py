"""Image loading (modes, EXIF, damaged files) and preparing an image for its bucket."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.images import (
    ImageLoadError,
    color_augment,
    is_image_file,
    load_image,
    prepare_image,
    read_image_size,
)
from library.errors import UserError


def _half_red_half_blue(width, height):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(pixels, mode="RGB")


def test_exif_rotated_jpeg_has_rotated_size_and_pixels(tmp_path):
    path = str(tmp_path / "rotated.jpg")
    image = _half_red_half_blue(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    image.save(path, exif=exif, quality=95)

    assert read_image_size(path) == (20, 40)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.size == (20, 40)
    top = np.asarray(loaded)[5, 10].astype(int)  # the stored left (red) half is now on top
    bottom = np.asarray(loaded)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_exif_orientation_without_side_swap_keeps_size(tmp_path):
    path = str(tmp_path / "upside_down.jpg")
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees
    _half_red_half_blue(40, 20).save(path, exif=exif, quality=95)
    assert read_image_size(path) == (40, 20)
    assert np.asarray(load_image(path))[10, 5, 2] > 200  # the blue right half is now on the left


def test_palette_with_transparency_becomes_rgba(tmp_path):
    path = str(tmp_path / "palette.png")
    image = Image.new("P", (4, 2), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    image.save(path, transparency=0)

    loaded = load_image(path)
    assert loaded.mode == "RGBA"
    assert loaded.getpixel((1, 0)) == (200, 100, 50, 255)
    assert loaded.getpixel((0, 0))[3] == 0


def test_palette_without_transparency_becomes_rgb(tmp_path):
    path = str(tmp_path / "palette.png")
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0, 0, 0] * 254)
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (200, 100, 50)


def test_grey_with_alpha_becomes_rgba(tmp_path):
    path = str(tmp_path / "la.png")
    Image.new("LA", (3, 3), (90, 40)).save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGBA"
    assert loaded.getpixel((2, 2)) == (90, 90, 90, 40)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = str(tmp_path / "cmyk.jpg")
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(path, quality=100)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    red, green, blue = loaded.getpixel((4, 4))
    assert red >= 250 and green <= 5 and blue >= 250  # no magenta ink + no others = magenta


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = str(tmp_path / "deep.png")
    values = np.array([[0, 65535, 128 * 257, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"

    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert np.asarray(loaded)[0, :, 0].tolist() == [0, 255, 128, 4]
    assert np.asarray(loaded)[0, 2].tolist() == [128, 128, 128]


def test_bitmap_bmp_and_webp_load_exactly(tmp_path):
    bitmap = Image.new("1", (4, 1), 0)
    bitmap.putpixel((3, 0), 1)
    bitmap.save(tmp_path / "mono.png")
    assert np.asarray(load_image(str(tmp_path / "mono.png")))[0, :, 1].tolist() == [0, 0, 0, 255]

    rgb = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), mode="RGB")
    rgb.save(tmp_path / "a.bmp")
    rgb.save(tmp_path / "a.webp", lossless=True)
    for name in ("a.bmp", "a.webp"):
        loaded = load_image(str(tmp_path / name))
        assert loaded.mode == "RGB"
        assert np.array_equal(np.asarray(loaded), np.asarray(rgb))


def test_image_extensions():
    assert [is_image_file(n) for n in ("a.JPG", "b.jpeg", "c.png", "d.webp", "e.Bmp", "f.gif", "g.txt")] == [
        True, True, True, True, True, False, False]


def test_corrupt_file_raises_image_load_error(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image at all" * 10)
    for read in (load_image, read_image_size):
        with pytest.raises(ImageLoadError) as caught:
            read(str(path))
        assert caught.value.path == str(path)
        assert "not a readable image" in caught.value.reason
        assert str(path) in str(caught.value)
        assert isinstance(caught.value, UserError)


def test_zero_byte_file_raises_image_load_error(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(str(path))
    with pytest.raises(ImageLoadError, match="empty"):
        read_image_size(str(path))


def test_truncated_png_fails_verify_and_load(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert read_image_size(str(path)) == (64, 64)  # the header alone is intact
    with pytest.raises(ImageLoadError):
        read_image_size(str(path), verify=True)
    with pytest.raises(ImageLoadError):
        load_image(str(path))


def test_missing_file_raises_image_load_error(tmp_path):
    with pytest.raises(ImageLoadError, match="No such file"):
        load_image(str(tmp_path / "nothing.png"))


def _column_ramp(width, height):
    """R = 2 * column, G = row, B = 7."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = (np.arange(width) * 2)[None, :]
    pixels[..., 1] = np.arange(height)[:, None]
    pixels[..., 2] = 7
    return Image.fromarray(pixels, mode="RGB")


def test_prepare_image_crops_and_flips():
    image = _column_ramp(100, 64)  # covers a 64x64 bucket as it is: only cropped
    rng_seed = 5
    expected_left = random.Random(rng_seed).randint(0, 36)

    plain = prepare_image(image, (64, 64), True, random.Random(rng_seed), flip=False)
    assert plain.pixels.shape == (3, 64, 64) and plain.pixels.dtype == torch.float32
    assert plain.alpha is None
    assert plain.original_size_hw == (64, 100)
    assert plain.crop_top_left == (0, expected_left)
    assert plain.pixels[0, 0, 0].item() == pytest.approx(2 * expected_left / 127.5 - 1)
    assert plain.pixels[1, 10, 0].item() == pytest.approx(10 / 127.5 - 1)
    assert plain.pixels[2].unique().tolist() == [pytest.approx(7 / 127.5 - 1)]

    flipped = prepare_image(image, (64, 64), True, random.Random(rng_seed), flip=True)
    assert flipped.crop_top_left == (0, 100 - expected_left - 64)
    assert torch.equal(flipped.pixels, torch.flip(plain.pixels, dims=[2]))


def test_prepare_image_resizes_to_cover_bucket_with_centre_crop():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    prepared = prepare_image(image, (64, 64), False, random.Random(0), flip=False)
    assert prepared.pixels.shape == (3, 64, 64)
    assert prepared.original_size_hw == (100, 200)
    assert prepared.crop_top_left == (0, 32)  # resized to 128x64, centred
    assert prepared.pixels[0].min().item() == 1.0 and prepared.pixels[1].max().item() == -1.0
    assert prepared.pixels.min().item() >= -1.0 and prepared.pixels.max().item() <= 1.0


def test_prepare_image_keeps_alpha_apart_from_colour():
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[..., :3] = (200, 100, 50)
    pixels[:, 32:, 3] = 255  # left half fully transparent
    image = Image.fromarray(pixels, mode="RGBA")
    prepared = prepare_image(image, (32, 32), False, random.Random(0), flip=True)
    assert prepared.alpha.shape == (1, 32, 32)
    assert prepared.alpha[0, 0, :16].tolist() == [1.0] * 16  # flipped: the opaque half is now left
    assert prepared.alpha[0, 0, 16:].tolist() == [0.0] * 16
    # transparent pixels keep their colour (no premultiplied-alpha blackening)
    expected = torch.tensor([200, 100, 50]) / 127.5 - 1
    assert torch.allclose(prepared.pixels[:, 5, 30], expected, atol=1e-6)


def _find_seed(first_draw_low, second_draw_high):
    for seed in range(1000):
        rng = random.Random(seed)
        first, second = rng.random(), rng.random()
        if (first <= 0.33) == first_draw_low and (second > 0.5) == second_draw_high:
            return seed
    raise AssertionError("no seed")


def test_color_augment_paths():
    image = Image.new("RGB", (4, 4), (128, 64, 32))
    untouched_seed = next(s for s in range(100) if random.Random(s).random() > 0.33)
    assert color_augment(image, random.Random(untouched_seed)) is image

    gamma_seed = _find_seed(True, False)
    replica = random.Random(gamma_seed)
    replica.random(), replica.random()
    gamma = replica.uniform(0.95, 1.05)
    expected = [round((v / 255) ** gamma * 255) for v in (128, 64, 32)]
    assert list(color_augment(image, random.Random(gamma_seed)).getpixel((0, 0))) == expected

    hue_seed = _find_seed(True, True)
    shifted = color_augment(image, random.Random(hue_seed)).getpixel((0, 0))
    assert shifted != (128, 64, 32)
    assert max(shifted) == pytest.approx(128, abs=2)  # hue changes, value stays
