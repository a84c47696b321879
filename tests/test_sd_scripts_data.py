"""sd-scripts' data-side options end to end: --in_json fine-tuning metadata with a flat --train_data_dir,
--masked_loss with conditioning_data_dir mask images, and resize_interpolation's pixels."""

import argparse
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.cli import run_training
from library.config.dataset_args import RESIZE_INTERPOLATIONS, add_dataset_arguments
from library.config.dataset_config import load_dataset_group
from library.data.dataset import SampleRef, TrainDataset, add_data_loading_arguments
from library.data.images import PIL_FILTERS, prepare_image
from library.data.loss_masks import check_masked_loss
from library.errors import UserError
from library.training.losses import per_sample_loss

CAPTIONS = {"00_red_circle": ("a red circle", "flat, red"), "01_blue_square": ("a blue square", None),
            "02_green_triangle": (None, "green, triangle")}


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    add_data_loading_arguments(parser)
    return parser.parse_args([str(arg) for arg in argv])


@pytest.fixture
def flat_folder(tmp_path):
    """Images directly in a folder (no `N_name` subfolders) and sd-scripts' metadata JSON for them."""
    from library.demo import draw_shape

    folder = tmp_path / "train_data"
    folder.mkdir()
    metadata = {}
    for index, (stem, (caption, tags)) in enumerate(CAPTIONS.items()):
        draw_shape((60 * index, 90, 200), ("circle", "square", "triangle")[index]).save(folder / f"{stem}.png")
        metadata[stem] = {key: value for key, value in (("caption", caption), ("tags", tags)) if value is not None}
        metadata[stem]["train_resolution"] = [64, 64]
    (tmp_path / "meta_cap.json").write_text(json.dumps(metadata), encoding="utf-8")
    return folder


def expected_captions():
    return {", ".join(part for part in pair if part) if pair[0] else pair[1] for pair in CAPTIONS.values()}


# ---- --in_json ------------------------------------------------------------------------------------

def test_in_json_with_a_flat_train_data_dir_is_one_fine_tuning_subset(flat_folder):
    meta = flat_folder.parent / "meta_cap.json"
    group = load_dataset_group(parse("--in_json", meta, "--train_data_dir", flat_folder, "--dataset_repeats", "3",
                                     "--resolution", "64", "--caption_separator", ", "))
    (subset,) = group.datasets[0].subsets
    assert (subset.metadata_file, subset.image_dir, subset.num_repeats) == (str(meta), str(flat_folder), 3)
    dataset = TrainDataset.from_spec(group, seed=1)
    assert {entry.caption for entry in dataset.entries} == expected_captions()
    assert dataset.num_samples_per_epoch() == 9


def test_in_json_mistakes_name_the_flags(flat_folder, tmp_path):
    meta = flat_folder.parent / "meta_cap.json"
    with pytest.raises(UserError, match="--reg_data_dir with --in_json: fine-tuning"):
        load_dataset_group(parse("--in_json", meta, "--train_data_dir", flat_folder, "--reg_data_dir", flat_folder))
    with pytest.raises(UserError, match=r"--in_json: file not found: .*missing\.json"):
        load_dataset_group(parse("--in_json", tmp_path / "missing.json", "--train_data_dir", flat_folder))
    config = tmp_path / "ds.toml"
    config.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{flat_folder}'\n")
    with pytest.raises(UserError, match="defines the image folders, so --in_json would be ignored"):
        load_dataset_group(parse("--dataset_config", config, "--in_json", meta))


def test_in_json_captions_reach_the_text_encoder(tiny_sd15_folder, flat_folder, tmp_path, monkeypatch):
    """sd-scripts' fine_tune.py workflow on sd_train.py: the metadata captions are what gets tokenized."""
    from library.families.sd_text import SDTokenizeStrategy

    tokenized = []
    original = SDTokenizeStrategy.tokenize

    def recording(self, captions):
        tokenized.extend(captions)
        return original(self, captions)

    monkeypatch.setattr(SDTokenizeStrategy, "tokenize", recording)
    run_training("sd", "full", [
        "--pretrained_model_name_or_path", tiny_sd15_folder, "--in_json", str(flat_folder.parent / "meta_cap.json"),
        "--train_data_dir", str(flat_folder), "--resolution", "64", "--output_dir", str(tmp_path / "out"),
        "--output_name", "ft", "--train_batch_size", "3", "--max_train_steps", "1", "--learning_rate", "1e-5",
        "--caption_separator", ", ",
    ])
    assert set(tokenized) == expected_captions()
    assert os.path.isfile(tmp_path / "out" / "ft.safetensors")


# ---- resize_interpolation -------------------------------------------------------------------------

@pytest.mark.parametrize("name", RESIZE_INTERPOLATIONS)
def test_resize_interpolation_resizes_with_pillows_filter_of_that_name(name):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    prepared = prepare_image(image, (64, 48), False, random.Random(0), flip=False, interpolation=name)
    direct = np.asarray(image.resize((72, 48), resample=PIL_FILTERS[name]).crop((4, 0, 68, 48)), dtype=np.float32)
    assert torch.equal(prepared.pixels, torch.from_numpy(direct).permute(2, 0, 1) / 127.5 - 1.0)
    default = prepare_image(image, (64, 48), False, random.Random(0), flip=False)
    assert name in ("area", "box") or not torch.equal(default.pixels, prepared.pixels)


# ---- masked loss ----------------------------------------------------------------------------------

def write_masks(folder, names, left_weight=0, size=(64, 64)):
    """Masks whose left half has red `left_weight` and right half 255 (green and blue say nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    mask[:, : size[0] // 2, 0] = left_weight
    mask[:, size[0] // 2:, 0] = 255
    mask[..., 1] = 77
    for name in names:
        Image.fromarray(mask).save(folder / f"{name}.png")
    return folder


def masked_dataset(tmp_path, images, masks, *extra):
    spec = load_dataset_group(parse("--in_json", images.parent / "meta_cap.json", "--train_data_dir", images,
                                    "--conditioning_data_dir", masks, "--resolution", "64", "--train_batch_size", "3",
                                    *extra))
    return spec, TrainDataset.from_spec(spec, seed=3)


def test_half_zero_mask_removes_that_halfs_loss_as_the_reference_formula(flat_folder, tmp_path):
    masks = write_masks(tmp_path / "masks", CAPTIONS)
    _, dataset = masked_dataset(tmp_path, flat_folder, masks, "--flip_aug")
    batch = dataset.make_batch([SampleRef(index, 0) for index in range(3)], epoch=1, global_step=0)
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    losses = per_sample_loss(pred, target, "l2", mask=batch["alpha_masks"])
    for row, mask in enumerate(batch["alpha_masks"]):
        flipped = bool(mask[0, 0, -1] == 0)  # flip_aug mirrors the mask with the image
        kept = slice(0, 4) if flipped else slice(4, 8)
        assert torch.equal(mask[0, :, kept.start * 8:kept.stop * 8], torch.ones(64, 32))
        assert mask.sum() == 64 * 32
        reference = ((pred[row] - target[row]) ** 2)[:, :, kept].sum() / (4 * 8 * 8)
        assert losses[row].item() == pytest.approx(reference.item(), rel=1e-6)


def test_grey_mask_weights_by_the_red_channel(flat_folder, tmp_path):
    masks = write_masks(tmp_path / "masks", CAPTIONS, left_weight=51)
    _, dataset = masked_dataset(tmp_path, flat_folder, masks)
    mask = dataset.make_batch([SampleRef(0, 0)], epoch=1, global_step=0)["alpha_masks"][0, 0]
    assert torch.allclose(mask[:, :32], torch.full((64, 32), 0.2)) and torch.equal(mask[:, 32:], torch.ones(64, 32))


def test_masked_loss_needs_masks_and_masks_need_the_flag(flat_folder, tmp_path):
    masks = write_masks(tmp_path / "masks", list(CAPTIONS)[:2])
    with pytest.raises(UserError, match=r"has no mask for 1 images \(02_green_triangle.png\)"):
        masked_dataset(tmp_path, flat_folder, masks)
    write_masks(masks, CAPTIONS)
    spec, _ = masked_dataset(tmp_path, flat_folder, masks)
    with pytest.raises(UserError, match="holds loss masks, which need --masked_loss"):
        check_masked_loss(spec, masked_loss=False)
    check_masked_loss(spec, masked_loss=True)
    plain = load_dataset_group(parse("--in_json", flat_folder.parent / "meta_cap.json", "--train_data_dir", flat_folder))
    with pytest.raises(UserError, match="--masked_loss needs masks: set conditioning_data_dir"):
        check_masked_loss(plain, masked_loss=True)


def test_sd_scripts_masked_loss_example_loads(flat_folder, tmp_path):
    """The subset of sd-scripts' masked-loss guide (a DreamBooth subset with conditioning_data_dir)."""
    masks = write_masks(tmp_path / "a_man_in_the_suit_mask", CAPTIONS)
    config = tmp_path / "ds.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{flat_folder}"\n'
                      f'caption_extension = ".txt"\nconditioning_data_dir = "{masks}"\nnum_repeats = 1\n')
    spec = load_dataset_group(parse("--dataset_config", config))
    assert spec.datasets[0].subsets[0].conditioning_data_dir == str(masks)
    dataset = TrainDataset.from_spec(spec, seed=1)
    assert sorted(os.path.basename(entry.mask_path) for entry in dataset.entries) == [f"{n}.png" for n in CAPTIONS]


@pytest.mark.parametrize("family, model_fixture, extra", [
    ("sd", "tiny_sd15_folder", []),
    ("sdxl", "tiny_sdxl_folder", []),
    ("flux", "tiny_flux_folder", ["--t5xxl_max_token_length", "16"]),
    ("sd3", "tiny_sd3_folder", ["--t5xxl_max_token_length", "16"]),
    ("lumina", "tiny_lumina_folder", ["--gemma2_max_token_length", "48"]),
])
def test_all_zero_masks_train_nothing(family, model_fixture, extra, flat_folder, tmp_path, request):
    """Through each family's real loss (latents, noise scheme, denoiser, unpacking): with every mask pixel 0
    no gradient reaches the LoRA, whose up weights (initialised to zero) stay zero; without --masked_loss
    they move."""
    model = request.getfixturevalue(model_fixture)
    masks = write_masks(tmp_path / "masks", CAPTIONS, size=(64, 64))
    for name in CAPTIONS:
        Image.new("RGB", (64, 64), (0, 255, 255)).save(masks / f"{name}.png")

    def train(output, *flags):
        run_training(family, "network", [
            "--pretrained_model_name_or_path", model, "--in_json", str(flat_folder.parent / "meta_cap.json"),
            "--train_data_dir", str(flat_folder), "--resolution", "64", "--output_dir", str(tmp_path / output),
            "--output_name", "lora", "--train_batch_size", "3", "--max_train_steps", "2", "--learning_rate", "1e-2",
            "--network_module", "networks.lora", "--network_dim", "2", "--cache_latents", *extra, *flags,
        ])
        return load_file(str(tmp_path / output / "lora.safetensors"))

    masked = train("masked", "--masked_loss", "--conditioning_data_dir", str(masks))
    ups = [tensor for key, tensor in masked.items() if key.endswith("lora_up.weight")]
    assert ups and all(torch.count_nonzero(tensor) == 0 for tensor in ups)
    plain = train("plain")
    assert any(torch.count_nonzero(tensor) > 0 for key, tensor in plain.items() if key.endswith("lora_up.weight"))


@pytest.fixture(scope="module")
def tiny_flux_folder(tmp_path_factory):
    from library.tiny_models.flux import save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(str(tmp_path_factory.mktemp("tiny_flux") / "folder"))


@pytest.fixture(scope="module")
def tiny_sd3_folder(tmp_path_factory):
    from library.tiny_models.sd3 import save_tiny_sd3_pipeline

    return save_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny_sd3") / "folder"))


@pytest.fixture(scope="module")
def tiny_lumina_folder(tmp_path_factory):
    from library.tiny_models.lumina import save_tiny_lumina_pipeline

    return save_tiny_lumina_pipeline(str(tmp_path_factory.mktemp("tiny_lumina") / "folder"))
