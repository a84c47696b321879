"""TrainDataset: scanning subsets, skipping bad files, regularisation balancing, epochs and batches."""

import json
import logging
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from library.config.dataset_spec import CaptionOptions, DatasetGroupSpec, DatasetSpec, SubsetSpec
from library.data.dataset import EpochLoader, SampleRef, TrainDataset, add_caching_arguments
from library.errors import UserError


def write_png(path, size=(64, 64), color=(255, 0, 0), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)
    return str(path)


def write_images(folder, names, caption_extension=".txt", size=(64, 64)):
    for index, name in enumerate(names):
        write_png(os.path.join(folder, f"{name}.png"), size=size, color=(index * 40, 0, 0))
        if caption_extension:
            with open(os.path.join(folder, name + caption_extension), "w", encoding="utf-8") as f:
                f.write(f"# comment\ncaption of {name}\n")
    return str(folder)


def group(*subsets, batch_size=2, resolution=(64, 64), **dataset_options):
    return DatasetGroupSpec([DatasetSpec(subsets=list(subsets), batch_size=batch_size, resolution=resolution,
                                         **dataset_options)], source="test.toml")


def subset(image_dir, **options):
    options.setdefault("caption_extension", ".txt")
    return SubsetSpec(image_dir=str(image_dir), **options)


def all_refs(dataset):
    return Counter(SampleRef(i, r) for i, e in enumerate(dataset.entries) for r in range(e.num_repeats))


def test_counts_repeats_and_captions(tmp_path):
    folder = write_images(tmp_path / "train", ["a", "b", "c"])
    dataset = TrainDataset.from_spec(group(subset(folder, num_repeats=2)), seed=1)
    assert [os.path.basename(e.image_path) for e in dataset.entries] == ["a.png", "b.png", "c.png"]
    assert [e.caption for e in dataset.entries] == ["caption of a", "caption of b", "caption of c"]
    assert [e.num_repeats for e in dataset.entries] == [2, 2, 2]
    assert dataset.num_samples_per_epoch() == 6
    assert dataset.num_batches_per_epoch() == 3
    entry = dataset.entries[0]
    assert (entry.image_size_wh, entry.bucket_wh, entry.is_reg, entry.dataset_index) == ((64, 64), (64, 64), False, 0)


def test_caption_fallbacks_class_tokens_then_empty_with_warning(tmp_path, caplog):
    folder = write_images(tmp_path / "train", ["a", "b"], caption_extension=None)
    dataset = TrainDataset.from_spec(group(subset(folder, class_tokens="sks dog")), seed=1)
    assert [e.caption for e in dataset.entries] == ["sks dog", "sks dog"]

    with caplog.at_level(logging.WARNING):
        dataset = TrainDataset.from_spec(group(subset(folder)), seed=1)
    assert [e.caption for e in dataset.entries] == ["", ""]
    assert "2 images in" in caplog.text and "empty caption" in caplog.text and "a.png" in caplog.text


def test_caption_from_path_walks_folders_and_skips_double_underscore(tmp_path):
    root = tmp_path / "train"
    write_png(root / "long_hair" / "x.png")
    write_png(root / "_misc" / "blue_eyes" / "y.png")
    write_png(root / "__excluded" / "z.png")
    write_png(root / "top.png")
    with open(root / "long_hair" / "x.txt", "w") as f:
        f.write("file caption wins")
    spec = group(subset(root, caption_from_path=True, class_tokens="fallback"))
    captions = {os.path.relpath(e.image_path, root): e.caption for e in TrainDataset.from_spec(spec, seed=0).entries}
    assert captions == {
        os.path.join("_misc", "blue_eyes", "y.png"): "blue eyes",
        os.path.join("long_hair", "x.png"): "file caption wins",
        "top.png": "fallback",
    }


def test_regularisation_repeated_to_match_training_samples(tmp_path):
    train = write_images(tmp_path / "train", ["a", "b", "c"])
    reg = write_images(tmp_path / "reg", ["r1", "r2", "r3", "r4"])
    spec = group(subset(train, num_repeats=2), subset(reg, is_reg=True))
    dataset = TrainDataset.from_spec(spec, seed=0, prior_loss_weight=0.25)
    regs = [e for e in dataset.entries if e.is_reg]
    assert [os.path.basename(e.image_path) for e in regs] == ["r1.png", "r2.png", "r3.png", "r4.png"]
    assert [e.num_repeats for e in regs] == [2, 2, 1, 1]  # 6 train samples: 4 + one more for r1, r2
    assert dataset.num_samples_per_epoch() == 12


def test_regularisation_trimmed_to_training_samples(tmp_path):
    train = write_images(tmp_path / "train", ["a", "b"])
    reg = write_images(tmp_path / "reg", [f"r{i}" for i in range(6)])
    spec = group(subset(train, num_repeats=1), subset(reg, is_reg=True, num_repeats=1))
    dataset = TrainDataset.from_spec(spec, seed=0)
    regs = [e for e in dataset.entries if e.is_reg]
    assert [os.path.basename(e.image_path) for e in regs] == ["r0.png", "r1.png"]
    assert [e.num_repeats for e in regs] == [1, 1]


def test_corrupt_and_zero_byte_images_are_skipped_with_warnings(tmp_path, caplog):
    folder = write_images(tmp_path / "train", ["good"])
    (tmp_path / "train" / "bad.png").write_bytes(b"garbage" * 20)
    (tmp_path / "train" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "notes.md").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        dataset = TrainDataset.from_spec(group(subset(folder)), seed=0)
    assert [os.path.basename(e.image_path) for e in dataset.entries] == ["good.png"]
    assert str(tmp_path / "train" / "bad.png") in caplog.text
    assert str(tmp_path / "train" / "empty.jpg") in caplog.text and "empty (0 bytes)" in caplog.text
    assert "skipped 2 images" in caplog.text


def test_non_utf8_caption_skips_its_image(tmp_path, caplog):
    folder = write_images(tmp_path / "train", ["good", "latin"])
    (tmp_path / "train" / "latin.txt").write_bytes(b"caf\xe9 au lait")
    with caplog.at_level(logging.WARNING):
        dataset = TrainDataset.from_spec(group(subset(folder)), seed=0)
    assert [os.path.basename(e.image_path) for e in dataset.entries] == ["good.png"]
    assert "latin.txt" in caplog.text and "UTF-8" in caplog.text
    assert "skipped 1 images" in caplog.text


def test_zero_usable_images_is_a_user_error_naming_the_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"")
    with pytest.raises(UserError) as caught:
        TrainDataset.from_spec(group(subset(empty), subset(broken)), seed=0)
    assert str(empty) in str(caught.value) and str(broken) in str(caught.value)
    assert "test.toml" in str(caught.value)


def test_missing_image_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TrainDataset.from_spec(group(subset(tmp_path / "nope")), seed=0)


def test_metadata_subset_captions_and_tags(tmp_path, caplog):
    images = tmp_path / "images"
    write_png(images / "one.png")
    write_png(images / "two.jpg")
    metadata = {"one": {"caption": "a cat", "tags": "red, cute"}, str(images / "two.jpg"): {"tags": "only tags"},
                "missing": {"caption": "x"}}
    metadata_file = tmp_path / "meta.json"
    metadata_file.write_text(json.dumps(metadata))
    spec = group(SubsetSpec(image_dir=str(images), metadata_file=str(metadata_file)))
    with caplog.at_level(logging.WARNING):
        dataset = TrainDataset.from_spec(spec, seed=0)
    assert [(os.path.basename(e.image_path), e.caption) for e in dataset.entries] == [
        ("one.png", "a cat,red, cute"), ("two.jpg", "only tags")]
    assert "missing" in caplog.text and "no such image" in caplog.text


def test_metadata_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        TrainDataset.from_spec(group(SubsetSpec(image_dir=str(tmp_path), metadata_file=str(bad))), seed=0)
    with pytest.raises(UserError, match="does not exist"):
        TrainDataset.from_spec(group(SubsetSpec(image_dir=str(tmp_path), metadata_file=str(tmp_path / "x.json"))), seed=0)


def _bucketed_dataset(tmp_path, seed=3):
    folder = tmp_path / "train"
    for index in range(5):
        write_png(folder / f"wide{index}.png", size=(192, 64))
        write_png(folder / f"tall{index}.png", size=(64, 192))
        write_png(folder / f"square{index}.png", size=(96, 96))
    spec = group(subset(folder, num_repeats=2, class_tokens="x"), batch_size=3, resolution=(64, 64),
                 enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    return TrainDataset.from_spec(spec, seed=seed)


def test_batches_are_complete_single_bucket_and_deterministic(tmp_path):
    dataset = _bucketed_dataset(tmp_path)
    batches = dataset.batches_for_epoch(1)
    assert Counter(ref for batch in batches for ref in batch) == all_refs(dataset)
    assert sum(len(b) for b in batches) == 30
    assert len(batches) == 12  # per bucket ceil(10 / 3) = 4, three buckets
    for batch in batches:
        assert len({dataset.entries[ref.entry_index].bucket_wh for ref in batch}) == 1
        assert 1 <= len(batch) <= 3
    assert {dataset.entries[b[0].entry_index].bucket_wh for b in batches} == {(96, 32), (32, 96), (64, 64)}

    again = _bucketed_dataset(tmp_path).batches_for_epoch(1)
    assert again == batches
    assert dataset.batches_for_epoch(2) != batches
    assert _bucketed_dataset(tmp_path, seed=4).batches_for_epoch(1) != batches


def test_multiple_datasets_keep_their_batch_size_and_resolution(tmp_path):
    small = write_images(tmp_path / "small", ["a", "b", "c"])
    large = write_images(tmp_path / "large", ["d", "e", "f", "g"], size=(128, 128))
    spec = DatasetGroupSpec([
        DatasetSpec(subsets=[subset(small)], batch_size=3, resolution=(64, 64)),
        DatasetSpec(subsets=[subset(large)], batch_size=2, resolution=(128, 128)),
    ])
    dataset = TrainDataset.from_spec(spec, seed=0)
    batches = dataset.batches_for_epoch(1)
    shapes = sorted((dataset.entries[b[0].entry_index].dataset_index, len(b)) for b in batches)
    assert shapes == [(0, 3), (1, 2), (1, 2)]
    sizes = {tuple(dataset.make_batch(b, 1, 0)["images"].shape) for b in batches}
    assert sizes == {(3, 3, 64, 64), (2, 3, 128, 128)}


def test_bucket_no_upscale_crops_small_images_without_resizing(tmp_path):
    folder = tmp_path / "train"
    write_png(folder / "small.png", size=(40, 30))
    spec = group(subset(folder, class_tokens="x"), resolution=(64, 64), enable_bucket=True, bucket_no_upscale=True,
                 bucket_reso_steps=16, min_bucket_reso=16, max_bucket_reso=128)
    dataset = TrainDataset.from_spec(spec, seed=0)
    entry = dataset.entries[0]
    assert (entry.bucket_wh, entry.resized_wh) == ((32, 16), (40, 30))
    batch = dataset.make_batch([SampleRef(0, 0)], 1, 0)
    assert batch["images"].shape == (1, 3, 16, 32)
    assert batch["crop_top_lefts"].tolist() == [[7, 4]]
    assert batch["original_sizes_hw"].tolist() == [[30, 40]]


def test_make_batch_keys_shapes_and_loss_weights(tmp_path):
    train = tmp_path / "train"
    write_png(train / "wide.png", size=(128, 64))
    write_png(train / "wide2.png", size=(128, 64))
    reg = write_images(tmp_path / "reg", ["r"], size=(128, 64))
    options = CaptionOptions(caption_prefix="photo of")
    spec = group(subset(train, class_tokens="sks", captions=options), subset(reg, is_reg=True),
                 batch_size=4, resolution=(64, 32))
    dataset = TrainDataset.from_spec(spec, seed=0, prior_loss_weight=0.5)
    refs = [SampleRef(0, 0), SampleRef(2, 0), SampleRef(1, 0)]
    batch = dataset.make_batch(refs, epoch=1, global_step=0)
    assert set(batch) == {"captions", "loss_weights", "image_paths", "sample_keys", "original_sizes_hw",
                          "crop_top_lefts", "target_sizes_hw", "images"}
    assert batch["sample_keys"] == ["0:0:wide.png:0", "0:1:r.png:0", "0:0:wide2.png:0"]
    assert batch["captions"] == ["photo of sks", "caption of r", "photo of sks"]
    assert batch["loss_weights"].tolist() == [1.0, 0.5, 1.0]
    assert batch["image_paths"] == [str(train / "wide.png"), str(tmp_path / "reg" / "r.png"), str(train / "wide2.png")]
    assert batch["original_sizes_hw"].tolist() == [[64, 128]] * 3
    assert batch["original_sizes_hw"].dtype == torch.long
    assert batch["crop_top_lefts"].tolist() == [[0, 0]] * 3  # 128x64 -> 64x32 exactly
    assert batch["target_sizes_hw"].tolist() == [[32, 64]] * 3
    assert batch["images"].shape == (3, 3, 32, 64) and batch["images"].dtype == torch.float32
    assert batch["images"][0, 0].unique().tolist() == [1.0]  # red
    assert batch["images"][0, 1].unique().tolist() == [-1.0]


def test_make_batch_alpha_masks_and_deterministic_flips(tmp_path):
    folder = tmp_path / "train"
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[:, :8, 3] = 255
    Image.fromarray(pixels, mode="RGBA").save(write_png(folder / "alpha.png"))
    write_png(folder / "plain.png", size=(32, 32))
    spec = group(subset(folder, class_tokens="x", alpha_mask=True, flip_aug=True), resolution=(32, 32))
    dataset = TrainDataset.from_spec(spec, seed=0)
    flips = []
    for epoch in range(1, 9):
        batch = dataset.make_batch([SampleRef(0, 0), SampleRef(1, 0)], epoch, 0)
        assert batch["alpha_masks"].shape == (2, 1, 32, 32)
        assert batch["alpha_masks"][1].unique().tolist() == [1.0]
        row = batch["alpha_masks"][0, 0, 0]
        flipped = row[-1].item() == 1.0
        assert row.sum().item() == 8 and row[0].item() == (0.0 if flipped else 1.0)
        flips.append(flipped)
        repeat = dataset.make_batch([SampleRef(0, 0), SampleRef(1, 0)], epoch, 0)
        assert torch.equal(repeat["alpha_masks"], batch["alpha_masks"])
    assert True in flips and False in flips


def test_epoch_loader_start_batch_gives_the_tail(tmp_path):
    dataset = _bucketed_dataset(tmp_path)
    steps = lambda index: 100 + index  # noqa: E731
    full = [dataset.make_batch(b, 2, 100 + i) for i, b in enumerate(dataset.batches_for_epoch(2))]
    tail = list(DataLoader(EpochLoader(dataset, 2, start_batch=5, global_step_of_batch=steps), batch_size=None))
    assert len(tail) == len(full) - 5
    for expected, got in zip(full[5:], tail):
        assert got["image_paths"] == expected["image_paths"]
        assert got["captions"] == expected["captions"]
        assert torch.equal(got["images"], expected["images"])


def test_epoch_loader_with_worker_processes(tmp_path):
    dataset = _bucketed_dataset(tmp_path)
    loader = EpochLoader(dataset, 1, start_batch=2)
    in_process = [loader[i]["image_paths"] for i in range(len(loader))]
    with_workers = [b["image_paths"] for b in DataLoader(loader, batch_size=None, num_workers=2)]
    assert with_workers == in_process


def test_latent_caching_rejects_pixel_augmentations(tmp_path):
    folder = write_images(tmp_path / "train", ["a"])
    for option in ("color_aug", "random_crop"):
        dataset = TrainDataset.from_spec(group(subset(folder, **{option: True})), seed=0)
        with pytest.raises(UserError, match=f"{option}.*--cache_latents"):
            dataset.validate_for_latent_caching()


def test_caching_arguments_defaults():
    import argparse

    from library.data.dataset import add_data_loading_arguments

    parser = argparse.ArgumentParser()
    add_caching_arguments(parser)
    add_data_loading_arguments(parser)
    args = parser.parse_args([])
    assert (args.cache_latents, args.cache_latents_to_disk, args.vae_batch_size, args.skip_cache_check,
            args.latents_cache_dir, args.max_data_loader_n_workers, args.prior_loss_weight) == (
        False, False, 1, False, None, 0, 1.0)
    groups = {action.dest: group.title for group in parser._action_groups for action in group._group_actions}
    assert groups["cache_latents"] == "latent caching"
    assert groups["max_data_loader_n_workers"] == groups["prior_loss_weight"] == "data loading"
