"""tools/cache_latents.py and tools/cache_text_encoder_outputs.py: the cache files they write, their
reuse by a later run and by training, rebuilding only a changed image, and accelerate sharding."""

import logging
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import run_script
from library.cli import run_training
from library.errors import UserError
from library.tools_common import choose_family_name, shard_entries
from tools.cache_latents import cache_latents
from tools.cache_text_encoder_outputs import cache_text_encoder_outputs


def entry(path):
    return SimpleNamespace(image_path=path)


def test_shard_entries_splits_by_image_and_covers_everything():
    entries = [entry(f"/d/img{i}.png") for i in range(7)] + [entry("/d/img3.png")]  # img3 in two datasets
    shards = [shard_entries(entries, rank, 3) for rank in range(3)]
    assert [[e.image_path[-8:] for e in shard] for shard in shards] == [
        ["img0.png", "img3.png", "img6.png", "img3.png"], ["img1.png", "img4.png"], ["img2.png", "img5.png"]]
    assert sorted(id(e) for shard in shards for e in shard) == sorted(id(e) for e in entries)
    assert shard_entries(entries, 0, 1) == entries
    with pytest.raises(ValueError):
        shard_entries(entries, 3, 3)


@pytest.mark.parametrize("argv, family", [
    ([], "sd"), (["--sdxl"], "sdxl"), (["--family", "flux"], "flux"), (["--flux", "--family", "flux"], "flux"),
])
def test_family_flags(argv, family):
    assert choose_family_name(argv + ["--dataset_config", "x.toml"]) == family


def test_conflicting_family_flags_and_config_file(tmp_path):
    with pytest.raises(UserError, match="conflicting family flags"):
        choose_family_name(["--sdxl", "--family", "sd"])
    config = tmp_path / "args.toml"
    config.write_text('[model]\nfamily = "sdxl"\n')
    assert choose_family_name(["--config_file", str(config)]) == "sdxl"


def model_args(folder, images):
    return ["--pretrained_model_name_or_path", folder, "--train_data_dir", images, "--resolution", "64"]


def cache_files(images, suffix):
    return sorted(name for _, _, files in os.walk(images) for name in files if name.endswith(suffix))


def test_latent_and_text_caches_are_reused_by_later_runs_and_training(tiny_sd15_folder, demo_image_root,
                                                                      tmp_path, caplog, capfd):
    cache_dir = str(tmp_path / "latents")
    args = model_args(tiny_sd15_folder, demo_image_root)
    counts = cache_latents([*args, "--latents_cache_dir", cache_dir, "--vae_batch_size", "4"])
    assert (counts.encoded, counts.reused) == (6, 0)
    assert "img/s" in capfd.readouterr().err  # the progress bar's rate
    latent_files = sorted(os.listdir(cache_dir))
    assert len(latent_files) == 6 and all(name.endswith("_0064x0064_sd.safetensors") for name in latent_files)
    with safe_open(os.path.join(cache_dir, latent_files[0]), "pt") as f:
        assert f.metadata()["family"] == "sd" and f.metadata()["bucket"] == "64x64"
        assert f.get_slice("latents").get_shape() == [4, 8, 8]
    counts = cache_text_encoder_outputs(args)
    assert (counts.encoded, counts.reused) == (6, 0) and len(cache_files(demo_image_root, "_sd_te.safetensors")) == 6

    args += ["--latents_cache_dir", cache_dir]
    assert (cache_latents(args).encoded, cache_text_encoder_outputs(args).encoded) == (0, 0)
    image = os.path.join(demo_image_root, "1_shape", "00_red_circle.png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(image)  # a changed image: only its latents rebuild
    counts = cache_latents(args)
    assert (counts.encoded, counts.reused) == (1, 5)

    caplog.set_level(logging.INFO)
    run_training("sd", "network", [
        *args, "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora", "--max_train_steps", "1",
        "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only",
    ])
    assert "latents: 0 images encoded, 6 reused from cache files" in caplog.text
    assert "text-encoder outputs: 0 entries encoded, 6 reused from cache files" in caplog.text
    assert (tmp_path / "out" / "last.safetensors").is_file()


def test_vae_only_loading_from_a_single_file(tiny_sd15_folder, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from library.families.sd import SDFamily
    from library.models.sd_checkpoint import save_sd15_single_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, local_files_only=True)
    single = save_sd15_single_file(pipe, str(tmp_path / "tiny.safetensors"))
    args = SimpleNamespace(vae=None, pretrained_model_name_or_path=single)
    vae = SDFamily().load_vae(args)
    assert isinstance(vae, AutoencoderKL)
    reference = pipe.vae.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in vae.state_dict().items())
    with pytest.raises(UserError, match="--pretrained_model_name_or_path"):
        SDFamily().load_vae(SimpleNamespace(vae=None, pretrained_model_name_or_path=None))


def test_cache_latents_command_line(tmp_path):
    """The script itself (its real runs are the in-process calls above: a subprocess run imports diffusers)."""
    result = run_script("tools/cache_latents.py", "--pretrained_model_name_or_path", str(tmp_path))
    assert result.returncode == 2
    assert "error: no training images given: pass --dataset_config" in result.stderr


def test_text_encoder_tool_needs_the_model(demo_image_root):
    with pytest.raises(SystemExit) as exit_info:
        cache_text_encoder_outputs(["--train_data_dir", demo_image_root])
    assert exit_info.value.code == 2  # argparse: --pretrained_model_name_or_path is required
