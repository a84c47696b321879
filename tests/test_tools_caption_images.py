"""tools/caption_images.py on tiny random Florence-2 and BLIP models: the caption files it writes (the
model's own greedy caption with the trigger word and prefix), kept and overwritten files, unreadable
images skipped, and one clear error for each bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from caption_fixtures import save_tiny_blip, save_tiny_florence2
from conftest import run_script, save_in_hub_cache
from library.errors import UserError
from tools.caption_images import caption_images

GREEDY = ["--num_beams", "1", "--max_length", "6"]


@pytest.fixture(scope="module")
def florence_folder(tmp_path_factory):
    return save_tiny_florence2(str(tmp_path_factory.mktemp("florence2")))


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    return save_tiny_blip(str(tmp_path_factory.mktemp("blip")))


def random_image(seed, size=(40, 30), mode="RGB"):
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(values, mode)


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    random_image(1).save(root / "a.png")
    random_image(2).save(root / "sub" / "b.jpg")
    random_image(3, mode="RGBA").save(root / "c.png")
    random_image(4).save(root / "kept.png")
    (root / "kept.txt").write_text("my own caption\n")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "notes.md").write_text("not an image either")
    return root


def expected_caption(folder, image_path, prompt=None):
    """The model's greedy caption computed with transformers directly (what the tool must write)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tools.caption_images import open_rgb

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    kwargs = {"text": [prompt]} if prompt else {}
    inputs = processor(images=[open_rgb(str(image_path))], return_tensors="pt", **kwargs)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, num_beams=1, do_sample=False)
    return " ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())


def test_florence2_captions_with_trigger_word_keeps_existing_and_skips_broken(florence_folder, image_dir):
    result = run_script("tools/caption_images.py", str(image_dir), "--model", florence_folder, "--trigger_word", "ohwx",
                        "--prefix", "photo of ", "--batch_size", "2", "--task", "detailed_caption", *GREEDY)
    assert result.returncode == 0, result.stderr
    for name in ("a", "sub/b", "c"):
        image = next(image_dir.glob(name + ".*"))
        caption = expected_caption(florence_folder, image, "<DETAILED_CAPTION>")
        assert caption and (image_dir / f"{name}.txt").read_text() == f"ohwx, photo of {caption}\n"
    assert (image_dir / "kept.txt").read_text() == "my own caption\n"
    assert not (image_dir / "broken.txt").exists() and not (image_dir / "notes.txt").exists()
    assert "broken.png" in result.stderr and "not a readable image" in result.stderr
    assert "captioned 3 images, kept 1 existing captions (--overwrite replaces them), skipped 1 unreadable" in result.stderr
    assert "img/s" in result.stderr or "s/img" in result.stderr  # the progress bar's rate
    assert not [name for name in os.listdir(image_dir) if name.endswith(".tmp")]


def test_blip_overwrite_without_recursion(blip_folder, image_dir):
    (image_dir / "sub" / "b.txt").write_text("untouched\n")
    counts = caption_images([str(image_dir), "--model", blip_folder, "--overwrite", "--no-recursive",
                             "--caption_extension", ".caption", *GREEDY])
    assert (counts.written, counts.kept, [os.path.basename(p) for p in counts.unreadable]) == (3, 0, ["broken.png"])
    for name in ("a", "c", "kept"):
        caption = expected_caption(blip_folder, image_dir / f"{name}.png")
        assert caption and (image_dir / f"{name}.caption").read_text() == caption + "\n"
    assert (image_dir / "sub" / "b.txt").read_text() == "untouched\n" and not (image_dir / "sub" / "b.caption").exists()
    (image_dir / "kept.txt").write_text("mine\n")
    counts = caption_images([str(image_dir), "--model", blip_folder, "--overwrite", "--no-recursive", *GREEDY])
    assert counts.written == 3 and (image_dir / "kept.txt").read_text() != "mine\n"


def test_hub_id_comes_from_the_offline_cache(blip_folder, image_dir, tmp_path, monkeypatch):
    cache = str(tmp_path / "hub")
    save_in_hub_cache(cache, "someone/tiny-blip", lambda folder: save_tiny_blip(folder))
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    counts = caption_images([str(image_dir / "sub"), "--model", "someone/tiny-blip", *GREEDY])
    assert counts.written == 1 and (image_dir / "sub" / "b.txt").read_text().strip()
    with pytest.raises(UserError, match=r"someone/missing is not in the Hugging Face cache .*hub"):
        caption_images([str(image_dir / "sub"), "--model", "someone/missing", "--overwrite"])


def write_config(folder, config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("argv_tail, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--caption_extension", "txt"], "--caption_extension must start with a dot"),
])
def test_bad_flags(image_dir, argv_tail, message):
    with pytest.raises(UserError, match=message):
        caption_images([str(image_dir), *argv_tail])


def test_bad_inputs_give_one_clear_error(tmp_path, image_dir):
    with pytest.raises(UserError, match="does not exist or is not a folder"):
        caption_images([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images .* found in"):
        caption_images([str(tmp_path / "empty")])
    remote = write_config(tmp_path / "remote", {"model_type": "florence2", "auto_map": {"AutoModel": "x.Y"}})
    with pytest.raises(UserError, match="remote code, which this tool never runs"):
        caption_images([str(image_dir), "--model", remote])
    other = write_config(tmp_path / "bert", {"model_type": "bert"})
    with pytest.raises(UserError, match="model_type 'bert'; caption_images.py runs blip, florence2"):
        caption_images([str(image_dir), "--model", other])
    with pytest.raises(UserError, match="neither a model folder nor a hub id"):
        caption_images([str(image_dir), "--model", str(tmp_path / "missing" / "folder")])
    result = run_script("tools/caption_images.py", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: image folder {tmp_path / 'nowhere'} does not exist or is not a folder; give the folder of images"]
