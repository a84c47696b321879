"""Training without the VAE: when every latent is already in a valid cache file, a run reads no VAE
weights and trains from the files; one changed image brings the VAE back for that image only."""

import logging
import os

import pytest
from safetensors import safe_open

from library.cli import run_training
from library.data.latent_cache import use_existing_cache_files
from library.families.sd import SDFamily
from test_latent_cache import CountingVae, FakeStrategy, cache, make_dataset, write_images


def train(folder, images, cache_dir, output_dir):
    run_training("sd", "network", [
        "--pretrained_model_name_or_path", folder, "--train_data_dir", images, "--resolution", "64",
        "--output_dir", output_dir, "--network_module", "networks.lora", "--max_train_steps", "1",
        "--cache_latents_to_disk", "--latents_cache_dir", cache_dir, "--network_train_unet_only",
    ])


@pytest.fixture
def load_spy(monkeypatch):
    """Records (with_vae, whether the loaded components hold a VAE) of every SDFamily.load call."""
    calls = []
    original = SDFamily.load

    def spy(self, args, with_vae=True):
        components = original(self, args, with_vae=with_vae)
        calls.append((with_vae, components.vae is not None))
        return components

    monkeypatch.setattr(SDFamily, "load", spy)
    return calls


def forbid_vae_loading(monkeypatch):
    import diffusers

    from library.models import sd_checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE was loaded although every latent is cached")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", refuse)
    monkeypatch.setattr(sd_checkpoint, "load_vae", refuse)
    monkeypatch.setattr(sd_checkpoint, "_load_vae_from_ldm", refuse)


def test_cached_latents_train_without_the_vae(tiny_sd15_folder, demo_image_root, tmp_path, monkeypatch, load_spy,
                                              caplog):
    caplog.set_level(logging.INFO)
    cache_dir = str(tmp_path / "latents")
    train(tiny_sd15_folder, demo_image_root, cache_dir, str(tmp_path / "out1"))
    assert load_spy == [(True, True)]
    assert "latents: 6 images encoded, 0 reused from cache files" in caplog.text
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 6
    stamps = {name: os.stat(os.path.join(cache_dir, name)).st_mtime_ns for name in files}

    caplog.clear()
    with monkeypatch.context() as patch:
        forbid_vae_loading(patch)
        train(tiny_sd15_folder, demo_image_root, cache_dir, str(tmp_path / "out2"))
    assert load_spy[1] == (False, False)
    assert "all latents cached: the VAE is not loaded" in caplog.text
    assert "latents: 0 images encoded, 6 reused from cache files" in caplog.text
    lora = tmp_path / "out2" / "last.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert any(key.startswith("lora_unet_") for key in f.keys())
    assert {name: os.stat(os.path.join(cache_dir, name)).st_mtime_ns for name in files} == stamps

    image = os.path.join(demo_image_root, "1_shape", "00_red_circle.png")
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same pixels, new mtime: stale cache
    caplog.clear()
    train(tiny_sd15_folder, demo_image_root, cache_dir, str(tmp_path / "out3"))
    assert load_spy[2] == (True, True)
    assert "all latents cached" not in caplog.text
    assert "latents: 1 images encoded, 5 reused from cache files" in caplog.text
    rebuilt = [name for name in files if os.stat(os.path.join(cache_dir, name)).st_mtime_ns != stamps[name]]
    assert len(rebuilt) == 1 and rebuilt[0].startswith("00_red_circle_")


def test_samples_keep_the_vae(tiny_sd15_folder, demo_image_root, tmp_path, load_spy):
    cache_dir = str(tmp_path / "latents")
    train(tiny_sd15_folder, demo_image_root, cache_dir, str(tmp_path / "out1"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 1\n")
    run_training("sd", "network", [
        "--pretrained_model_name_or_path", tiny_sd15_folder, "--train_data_dir", demo_image_root, "--resolution", "64",
        "--output_dir", str(tmp_path / "out2"), "--network_module", "networks.lora", "--max_train_steps", "1",
        "--cache_latents_to_disk", "--latents_cache_dir", cache_dir, "--network_train_unet_only",
        "--sample_prompts", str(prompts), "--sample_at_first",
    ])
    assert load_spy == [(True, True), (True, True)]


def test_use_existing_cache_files_is_all_or_nothing(tmp_path):
    folder = write_images(tmp_path / "train", ["a", "b", "c"])
    cache(make_dataset(folder), CountingVae())
    os.remove(os.path.join(folder, "b_0064x0064_fake.safetensors"))
    dataset = make_dataset(folder)
    assert not use_existing_cache_files(dataset, FakeStrategy(), cache_dir=None, skip_cache_check=False)
    assert [dataset.cached_latents(entry) for entry in dataset.entries] == [None, None, None]

    cache(make_dataset(folder), CountingVae())
    assert use_existing_cache_files(dataset, FakeStrategy(), cache_dir=None, skip_cache_check=False)
    assert [dataset.cached_latents(entry).path for entry in dataset.entries] == [
        os.path.join(folder, f"{name}_0064x0064_fake.safetensors") for name in "abc"]
    assert dataset.is_latent_cached
    assert not use_existing_cache_files(make_dataset(folder), FakeStrategy({"vae": "other"}), cache_dir=None,
                                        skip_cache_check=False)  # another VAE's latents are stale
