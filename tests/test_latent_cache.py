"""Latent cache: memory and disk caching, reuse, and every reason a cache file is stale."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from library.config.dataset_spec import CaptionOptions, DatasetGroupSpec, DatasetSpec, SubsetSpec
from library.data.dataset import SampleRef, TrainDataset
from library.data.latent_cache import (
    CACHE_FORMAT_VERSION,
    cache_dataset_latents,
    cache_file_path,
    is_cache_valid,
)
from library.errors import UserError
from library.strategies import LatentsCachingStrategy


def write_png(path, size=(64, 64), color=(255, 0, 0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_images(folder, names):
    """`<name>.png` images of different reds with `<name>.txt` captions."""
    for index, name in enumerate(names):
        write_png(os.path.join(folder, f"{name}.png"), color=(index * 40, 0, 0))
        with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write(f"caption of {name}")
    return str(folder)


class CountingVae:
    """Stands in for a VAE: 8x8 average pooling to 4 channels; counts the images it encodes."""

    def __init__(self):
        self.encoded = 0

    def __call__(self, images):
        self.encoded += images.shape[0]
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


class FakeStrategy(LatentsCachingStrategy):
    family = "fake"
    latent_channels = 4

    def __init__(self, extra_identity=None):
        self.extra_identity = extra_identity or {}

    def encode(self, vae, images):
        return vae(images) * 2.0

    def decode(self, vae, latents):
        raise NotImplementedError("not needed for caching")

    def cache_identity(self):
        return {**super().cache_identity(), **self.extra_identity}


def make_dataset(folder, resolution=(64, 64), **subset_options):
    subset_options.setdefault("caption_extension", ".txt")
    spec = DatasetGroupSpec([DatasetSpec(subsets=[SubsetSpec(image_dir=str(folder), **subset_options)],
                                         batch_size=2, resolution=resolution)])
    return TrainDataset.from_spec(spec, seed=7)


def cache(dataset, vae, strategy=None, **options):
    options = {"to_disk": True, "batch_size": 2, "device": "cpu", "dtype": torch.float32,
               "skip_cache_check": False, "cache_dir": None, **options}
    return cache_dataset_latents(dataset, strategy or FakeStrategy(), vae, **options)


@pytest.fixture
def folder(tmp_path):
    return write_images(tmp_path / "train", ["a", "b", "c"])


def test_memory_cache_matches_encoding_the_uncached_batch(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    ramp = np.zeros((64, 97, 3), dtype=np.uint8)
    ramp[..., 0] = np.arange(97)[None, :] * 2
    Image.fromarray(ramp).save(folder / "wide.png")  # odd spare width: the flipped crop offset differs
    write_png(folder / "square.png", size=(64, 64), color=(250, 0, 90))
    dataset = make_dataset(folder, flip_aug=True, class_tokens="a, b, c, d, e, f, g, h",
                           captions=CaptionOptions(shuffle_caption=True))
    refs = [SampleRef(0, 0), SampleRef(1, 0)]
    uncached = [dataset.make_batch(refs, epoch, 0) for epoch in range(1, 5)]

    vae = CountingVae()
    counts = cache(dataset, vae, to_disk=False)
    assert (counts.encoded, counts.reused, counts.skipped) == (2, 0, 0)
    assert vae.encoded == 4  # every image and its flipped copy
    assert dataset.is_latent_cached
    first = dataset.cached_latents(dataset.entries[0])
    assert first.latents.shape == (4, 8, 8) and first.path is None
    flips = set()
    for epoch, expected in zip(range(1, 5), uncached):
        batch = dataset.make_batch(refs, epoch, 0)
        wide = dataset.cached_latents(dataset.entries[1])  # entries are sorted by path: square.png, wide.png
        flipped = torch.equal(batch["latents"][1], wide.latents_flipped)
        assert flipped or torch.equal(batch["latents"][1], wide.latents)
        assert batch["crop_top_lefts"][1].tolist() == [0, 17 if flipped else 16]
        flips.add(flipped)
        assert "images" not in batch and batch["latents"].shape == (2, 4, 8, 8)
        assert torch.allclose(batch["latents"], FakeStrategy().encode(CountingVae(), expected["images"]), atol=1e-6)
        assert len(set(batch["captions"])) == 2  # shuffled, identically with and without the cache
        for key in ("captions", "image_paths"):
            assert batch[key] == expected[key]
        for key in ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw", "loss_weights"):
            assert torch.equal(batch[key], expected[key]), key
    assert flips == {True, False}


def test_disk_cache_written_then_reused(folder):
    dataset = make_dataset(folder, alpha_mask=True)
    vae = CountingVae()
    counts = cache(dataset, vae)
    assert (counts.encoded, counts.reused, vae.encoded) == (3, 0, 3)
    path = os.path.join(folder, "a_0064x0064_fake.safetensors")
    first = dataset.cached_latents(dataset.entries[0])
    assert first.path == path and first.latents is None
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == ["alpha_mask", "latents"]
        assert f.get_tensor("alpha_mask").shape == (1, 64, 64)
        metadata = f.metadata()
    stat = os.stat(os.path.join(folder, "a.png"))
    assert metadata == {
        "format_version": CACHE_FORMAT_VERSION, "family": "fake", "latent_channels": "4", "vae": "",
        "identity_keys": "family,latent_channels,vae", "bucket": "64x64", "original_size": "64x64",
        "resized_size": "64x64", "resize_interpolation": "default", "crop_left_top": "0,0",
        "source_size": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns), "flip": "0", "alpha_mask": "1",
    }

    batch = dataset.make_batch([SampleRef(0, 0), SampleRef(2, 0)], 1, 0)
    assert batch["latents"].shape == (2, 4, 8, 8)
    assert batch["alpha_masks"].unique().tolist() == [1.0]

    fresh = make_dataset(folder, alpha_mask=True)
    vae = CountingVae()
    counts = cache(fresh, vae)
    assert (counts.encoded, counts.reused, vae.encoded) == (0, 3, 0)
    assert torch.equal(fresh.make_batch([SampleRef(0, 0), SampleRef(2, 0)], 1, 0)["latents"], batch["latents"])


def test_touched_source_image_makes_its_cache_stale(folder):
    cache(make_dataset(folder), CountingVae())
    image = os.path.join(folder, "b.png")
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    dataset = make_dataset(folder)
    entry = dataset.entries[1]
    assert not is_cache_valid(cache_file_path(entry, FakeStrategy()), entry, FakeStrategy(), need_flip=False)
    assert is_cache_valid(cache_file_path(dataset.entries[0], FakeStrategy()), dataset.entries[0], FakeStrategy(), False)
    vae = CountingVae()
    counts = cache(dataset, vae)
    assert (counts.encoded, counts.reused, vae.encoded) == (1, 2, 1)

    # --skip_cache_check trusts whatever file is there
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    counts = cache(make_dataset(folder), CountingVae(), skip_cache_check=True)
    assert (counts.encoded, counts.reused) == (0, 3)


def test_bucket_change_makes_cache_stale(folder):
    old = make_dataset(folder)
    cache(old, CountingVae())
    old_path = old.cached_latents(old.entries[0]).path

    new = make_dataset(folder, resolution=(64, 32))
    entry = new.entries[0]
    assert entry.bucket_wh == (64, 32)
    assert not is_cache_valid(old_path, entry, FakeStrategy(), need_flip=False)
    counts = cache(new, CountingVae())
    assert (counts.encoded, counts.reused) == (3, 0)
    assert new.cached_latents(entry).path == os.path.join(folder, "a_0064x0032_fake.safetensors")


def test_resize_interpolation_change_makes_cache_stale(folder):
    """The resize filter is part of the cache key: cached latents of other pixels are never reused."""
    write_png(os.path.join(folder, "big.png"), size=(96, 96), color=(10, 200, 30))
    cache(make_dataset(folder), CountingVae())
    nearest = make_dataset(folder, resize_interpolation="nearest")
    big = next(entry for entry in nearest.entries if entry.image_path.endswith("big.png"))
    path = cache_file_path(big, FakeStrategy())
    assert not is_cache_valid(path, big, FakeStrategy(), need_flip=False)
    assert cache(nearest, CountingVae()).encoded == 4
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["resize_interpolation"] == "nearest"
    assert cache(make_dataset(folder, resize_interpolation="nearest"), CountingVae()).reused == 4


def test_mask_images_are_cached_and_a_changed_mask_makes_the_cache_stale(folder, tmp_path):
    masks = tmp_path / "masks"
    for name in ("a", "b", "c"):
        write_png(str(masks / f"{name}.png"), color=(255, 0, 0))
    cache(make_dataset(folder, conditioning_data_dir=str(masks)), CountingVae())
    dataset = make_dataset(folder, conditioning_data_dir=str(masks))
    entry = dataset.entries[1]
    path = cache_file_path(entry, FakeStrategy())
    assert is_cache_valid(path, entry, FakeStrategy(), need_flip=False)
    with safe_open(path, framework="pt") as f:
        assert torch.equal(f.get_tensor("alpha_mask"), torch.ones(1, 64, 64))
    half = np.zeros((64, 64, 3), dtype=np.uint8)
    half[:, :32, 0] = 255
    Image.fromarray(half).save(masks / "b.png")
    os.utime(masks / "b.png", ns=(0, os.stat(masks / "b.png").st_mtime_ns + 1_000_000_000))
    assert not is_cache_valid(path, entry, FakeStrategy(), need_flip=False)
    assert cache(dataset, CountingVae()).encoded == 1
    latents, alpha = dataset.cached_latents(entry).load(False)
    assert torch.equal(alpha[0, :, :32], torch.ones(64, 32)) and torch.equal(alpha[0, :, 32:], torch.zeros(64, 32))


def test_family_identity_change_makes_cache_stale(folder):
    cache(make_dataset(folder), CountingVae())
    dataset = make_dataset(folder)
    entry = dataset.entries[0]
    path = cache_file_path(entry, FakeStrategy())
    assert is_cache_valid(path, entry, FakeStrategy(), need_flip=False)
    assert not is_cache_valid(path, entry, FakeStrategy({"vae": "other.safetensors"}), need_flip=False)

    class OtherFamily(FakeStrategy):
        family = "other"

    assert not is_cache_valid(path, entry, OtherFamily(), need_flip=False)
    counts = cache(dataset, CountingVae(), strategy=FakeStrategy({"vae": "other.safetensors"}))
    assert (counts.encoded, counts.reused) == (3, 0)


def test_missing_flip_or_alpha_makes_cache_stale(folder):
    cache(make_dataset(folder), CountingVae())
    flipping = make_dataset(folder, flip_aug=True)
    entry = flipping.entries[0]
    assert not is_cache_valid(cache_file_path(entry, FakeStrategy()), entry, FakeStrategy(), need_flip=True)
    assert not is_cache_valid(cache_file_path(entry, FakeStrategy()), entry, FakeStrategy(), False, need_alpha=True)
    vae = CountingVae()
    assert cache(flipping, vae).encoded == 3 and vae.encoded == 6
    with safe_open(flipping.cached_latents(entry).path, framework="pt") as f:
        assert sorted(f.keys()) == ["latents", "latents_flipped"]
        assert f.metadata()["flip"] == "1"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_file_is_rebuilt(folder, damage):
    cache(make_dataset(folder), CountingVae())
    dataset = make_dataset(folder)
    path = cache_file_path(dataset.entries[2], FakeStrategy())
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"garbage": b"\x00\xff" * 100, "truncated": data[: len(data) - 20], "empty": b""}[damage])
    assert not is_cache_valid(path, dataset.entries[2], FakeStrategy(), need_flip=False)
    vae = CountingVae()
    counts = cache(dataset, vae)
    assert (counts.encoded, counts.reused, vae.encoded) == (1, 2, 1)
    assert is_cache_valid(path, dataset.entries[2], FakeStrategy(), need_flip=False)


def test_cache_dir_names_do_not_collide(tmp_path):
    first = write_images(tmp_path / "one", ["same"])
    second = write_images(tmp_path / "two", ["same"])
    spec = DatasetGroupSpec([DatasetSpec(subsets=[SubsetSpec(image_dir=first, caption_extension=".txt"),
                                                  SubsetSpec(image_dir=second, caption_extension=".txt")],
                                         resolution=(64, 64))])
    dataset = TrainDataset.from_spec(spec, seed=0)
    cache_dir = str(tmp_path / "cache")
    assert cache(dataset, CountingVae(), cache_dir=cache_dir).encoded == 2
    names = sorted(os.listdir(cache_dir))
    assert len(names) == 2 and all(n.startswith("same_") and n.endswith("_0064x0064_fake.safetensors") for n in names)
    assert sorted(os.path.basename(dataset.cached_latents(e).path) for e in dataset.entries) == names
    assert not any(name.endswith(".safetensors") for name in os.listdir(first))
    assert cache(TrainDataset.from_spec(spec, seed=0), CountingVae(), cache_dir=cache_dir).reused == 2


def test_image_damaged_after_scan_is_dropped_while_caching(folder, caplog):
    dataset = make_dataset(folder)
    with open(os.path.join(folder, "b.png"), "wb") as f:
        f.write(b"")
    counts = cache(dataset, CountingVae(), to_disk=False)
    assert (counts.encoded, counts.skipped) == (2, 1)
    assert [os.path.basename(e.image_path) for e in dataset.entries] == ["a.png", "c.png"]
    assert "b.png" in caplog.text


def test_caching_rejects_color_aug(folder):
    with pytest.raises(UserError, match="color_aug"):
        cache(make_dataset(folder, color_aug=True), CountingVae())


def test_weights_identity_names_the_vae_without_loading_it(tmp_path):
    from library.strategies import weights_identity

    weights = tmp_path / "vae.safetensors"
    weights.write_bytes(b"12345")
    first = weights_identity(str(weights))
    assert first.startswith("vae.safetensors:5:")
    os.utime(weights, ns=(1, 1))
    assert weights_identity(str(weights)) != first  # replaced weights make the cache stale
    folder = tmp_path / "model"
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert weights_identity(str(folder)).startswith("vae/diffusion_pytorch_model.safetensors:1:")
    assert weights_identity("org/model-on-hub") == "org/model-on-hub"
