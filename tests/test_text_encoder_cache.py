"""Cached text-encoder outputs: reuse, per-entry invalidation, dropout and caption variants."""

import os

import pytest
import torch

import library.data.text_encoder_cache as te_cache
from library.cli import run_training
from library.config.arguments import parse_training_args
from library.config.dataset_config import load_dataset_group
from library.data.dataset import TrainDataset
from library.errors import UserError
from library.families import get_family


def argv(model, images, output, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", images, "--resolution", "64",
            "--output_dir", str(output), "--network_train_unet_only", "--network_dim", "2", "--seed", "3", *extra]


@pytest.fixture
def encode_counter(monkeypatch):
    """Counts the captions each caching run sends through the text encoders (the empty one aside)."""
    encoded: list[str] = []
    real = te_cache._encode

    def counting(texts, *rest):
        encoded.extend(text for text in texts if text)
        return real(texts, *rest)

    monkeypatch.setattr(te_cache, "_encode", counting)
    return encoded


@pytest.mark.parametrize("family, model_fixture", [("sd", "tiny_sd15_folder"), ("sdxl", "tiny_sdxl_folder")])
def test_disk_cache_is_reused_and_only_an_edited_caption_is_rebuilt(family, model_fixture, request, demo_image_root,
                                                                    tmp_path, encode_counter):
    common = argv(request.getfixturevalue(model_fixture), demo_image_root, tmp_path / "out", "--max_train_steps", "1",
                  "--cache_text_encoder_outputs_to_disk")
    run_training(family, "network", common)
    assert len(encode_counter) == 6
    folder = os.path.join(demo_image_root, "1_shape")
    cache_files = sorted(f for f in os.listdir(folder) if f.endswith(f"_{family}_te.safetensors"))
    assert len(cache_files) == 6
    mtimes = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in cache_files}

    encode_counter.clear()
    run_training(family, "network", common)
    assert encode_counter == []  # everything reused

    with open(os.path.join(folder, "02_green_triangle.caption"), "w", encoding="utf-8") as f:
        f.write("a lime triangle\n")
    run_training(family, "network", common)
    assert encode_counter == ["a lime triangle"]
    changed = [f for f in cache_files if os.stat(os.path.join(folder, f)).st_mtime_ns != mtimes[f]]
    assert changed == [f"02_green_triangle_{family}_te.safetensors"]


def cached_dataset(model, images, tmp_path, *extra):
    family, args = parse_training_args(get_family("sd"), "network",
                                       argv(model, images, tmp_path / "out", "--cache_text_encoder_outputs", *extra))
    components = family.load(args)
    dataset = TrainDataset.from_spec(load_dataset_group(args), seed=args.seed)
    te_cache.cache_dataset_text_encoder_outputs(dataset, family, args, components, "cpu")
    tokenize, encode = family.tokenize_strategy(args, components), family.text_encoding_strategy(args)

    def fresh(text):
        with torch.no_grad():
            return encode.encode(components.text_encoders, tokenize.tokenize([text]))["encoder_hidden_states"][0]

    return dataset, fresh


def all_samples(dataset, epochs):
    for epoch in epochs:
        for refs in dataset.batches_for_epoch(epoch):
            batch = dataset.make_batch(refs, epoch, 0)
            for row, caption in enumerate(batch["captions"]):
                yield epoch, caption, batch["conditioning"]["encoder_hidden_states"][row]


def test_dropped_captions_use_the_cached_empty_conditioning(tiny_sd15_folder, demo_image_root, tmp_path):
    dataset, fresh = cached_dataset(tiny_sd15_folder, demo_image_root, tmp_path, "--caption_dropout_rate", "0.5")
    samples = list(all_samples(dataset, range(1, 4)))
    dropped = [s for s in samples if s[1] == ""]
    assert 0 < len(dropped) < len(samples)
    empty = fresh("")
    for _, _, conditioning in dropped:
        assert torch.equal(conditioning, dataset.text_source.empty_conditioning["encoder_hidden_states"])
        torch.testing.assert_close(conditioning, empty)
    for _, caption, conditioning in samples:
        if caption:
            torch.testing.assert_close(conditioning, fresh(caption))


def test_shuffled_captions_are_cached_as_variants_drawn_per_epoch(tiny_sd15_folder, demo_image_root, tmp_path):
    dataset, fresh = cached_dataset(tiny_sd15_folder, demo_image_root, tmp_path, "--shuffle_caption",
                                    "--text_encoder_cache_variants", "4")
    entry = dataset.entries[0]  # "a red circle, flat drawing": two tags to shuffle
    variants = dataset.cached_text(entry).variants
    assert len(variants) == 4 and len(set(variants)) == 2
    assert all(sorted(v.split(", ")) == sorted(entry.caption.split(", ")) for v in variants)
    seen: dict[str, set] = {}
    for _, caption, conditioning in all_samples(dataset, range(1, 7)):
        torch.testing.assert_close(conditioning, fresh(caption))
        seen.setdefault(", ".join(sorted(caption.split(", "))), set()).add(caption)
    assert any(len(variants) > 1 for variants in seen.values())  # different epochs drew different variants


def test_bad_combinations_are_rejected(tiny_sd15_folder, demo_image_root, tmp_path):
    family = get_family("sd")
    with pytest.raises(UserError, match="cannot train the text encoders"):
        parse_training_args(family, "network", [a for a in argv(tiny_sd15_folder, demo_image_root, tmp_path,
                                                                 "--cache_text_encoder_outputs")
                                                if a != "--network_train_unet_only"])
    with pytest.raises(UserError, match="--text_encoder_cache_variants N"):
        cached_dataset(tiny_sd15_folder, demo_image_root, tmp_path, "--shuffle_caption")
    with pytest.raises(UserError, match="token_warmup_step"):
        cached_dataset(tiny_sd15_folder, demo_image_root, tmp_path, "--token_warmup_step", "5")
