"""Offline means "use the cache": hub ids resolve to the snapshot in the user's Hugging Face cache
(HF_HOME / HF_HUB_CACHE, the hub layout with refs/main) when HF_HUB_OFFLINE is set, and the error names
the repository and the cache folder only when it is not there."""

import os
import shutil

import pytest

from conftest import save_in_hub_cache
from library.errors import UserError


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return str(tmp_path / "hf" / "hub")


def test_t5_tokenizer_comes_from_the_cache(hf_home, tmp_path):
    from library.models.t5_tokenizer import T5_HUB_ID, load_t5_tokenizer, train_sentencepiece_t5_tokenizer

    with pytest.raises(UserError, match=f"no T5 tokenizer: .* {T5_HUB_ID} is not in the Hugging Face cache {hf_home}"):
        load_t5_tokenizer(None, None)
    train_sentencepiece_t5_tokenizer(str(tmp_path / "t5"))
    local = load_t5_tokenizer(str(tmp_path / "t5"))
    save_in_hub_cache(hf_home, T5_HUB_ID, local.save_pretrained)
    cached = load_t5_tokenizer(None, None)
    caption = "a photo of a cat sitting on a red chair"
    assert cached(caption).input_ids == local(caption).input_ids and len(cached) == len(local)


def test_hub_cache_environment_variable_wins(tmp_path, monkeypatch):
    from library.models.hub_cache import hub_cache_dir

    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == str(tmp_path / "cache")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    assert hub_cache_dir() == os.path.join(str(tmp_path / "home"), "hub")


def test_gemma_tokenizer_comes_from_the_cache(hf_home, tmp_path):
    from library.models.gemma_tokenizer import GEMMA_HUB_ID, load_gemma_tokenizer, train_sentencepiece_gemma_tokenizer

    save_in_hub_cache(hf_home, GEMMA_HUB_ID, lambda folder: None)  # cached, but without tokenizer files
    with pytest.raises(UserError, match=f"no Gemma tokenizer: the cached {GEMMA_HUB_ID} in .* has none of "
                                        "tokenizer.model, tokenizer.json; pass --gemma2_tokenizer"):
        load_gemma_tokenizer(None, None)
    train_sentencepiece_gemma_tokenizer(str(tmp_path / "gemma"))
    local = load_gemma_tokenizer(str(tmp_path / "gemma"))
    save_in_hub_cache(hf_home, GEMMA_HUB_ID, local.save_pretrained)
    cached = load_gemma_tokenizer(None, None)
    assert cached.padding_side == "right" and cached("a cat").input_ids == local("a cat").input_ids


def test_model_hub_id_loads_from_the_cache(hf_home, tiny_sd15_folder):
    from library.models.sd_checkpoint import load_sd_models

    with pytest.raises(UserError, match=f"no model someone/tiny-sd: .* not in the Hugging Face cache {hf_home}"):
        load_sd_models("someone/tiny-sd")
    save_in_hub_cache(hf_home, "someone/tiny-sd", lambda folder: shutil.copytree(tiny_sd15_folder, folder,
                                                                                 dirs_exist_ok=True))
    models = load_sd_models("someone/tiny-sd")
    assert models.unet.config.sample_size == load_sd_models(tiny_sd15_folder).unet.config.sample_size
