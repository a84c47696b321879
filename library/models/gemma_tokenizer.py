"""The Gemma-2 tokenizer Lumina Image 2.0 needs: from a local folder or `.model` file, a diffusers folder, or the hub.

Like T5 (library/models/t5_tokenizer.py), no PyPI package ships Gemma's vocabulary (the model is gated on the hub), so
offline users point `--gemma2_tokenizer` at a folder holding `tokenizer.model` or `tokenizer.json`
(e.g. a diffusers Lumina 2 folder's `tokenizer/`) or at a sentencepiece `.model` file. Without it a
diffusers folder's own `tokenizer/` is used, else `google/gemma-2-2b` (from the Hugging Face cache when
the hub is offline, library/models/hub_cache.py).
`train_sentencepiece_gemma_tokenizer` trains a small sentencepiece model in Gemma's conventions
(pad 0, eos 1, bos 2, unk 3; a BOS is prepended) for tests and the tiny built-in Lumina 2.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Optional

from library.errors import UserError

GEMMA_HUB_ID = "google/gemma-2-2b"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_TINY_CORPUS = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts. <Prompt Start> a photo of a cat",
    "a painting of a blue square and a yellow circle", "portrait of a woman with long hair, high quality",
    "the quick brown fox jumps over the lazy dog", "a landscape with mountains, a lake and trees at sunset",
    "anime girl, smiling, white background", "shape, triangle, green, red, simple drawing",
)


def _from_folder(folder: str):
    from transformers import GemmaTokenizerFast

    try:
        tokenizer = GemmaTokenizerFast.from_pretrained(folder, local_files_only=True, add_bos_token=True)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load a Gemma tokenizer from {folder}: {e}") from e
    return right_padded(tokenizer)


def right_padded(tokenizer):
    """Lumina 2 reads the caption's valid tokens first (its rotary positions and refiner mask assume
    right padding, as sd-scripts sets it); Gemma's own configs pad on the left."""
    tokenizer.padding_side = "right"
    return tokenizer


def load_gemma_tokenizer(path: Optional[str] = None, model_folder: Optional[str] = None):
    """Gemma tokenizer from --gemma2_tokenizer `path` (folder or .model file), a diffusers folder's
    tokenizer/, or the hub; UserError naming the flag when none is available."""
    if path:
        if os.path.isdir(path):
            if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
                raise UserError(f"--gemma2_tokenizer {path}: the folder has neither tokenizer.model nor tokenizer.json")
            return _from_folder(path)
        if os.path.isfile(path):
            if not path.endswith(".model"):
                raise UserError(f"--gemma2_tokenizer {path}: pass a folder or a sentencepiece .model file")
            with tempfile.TemporaryDirectory() as folder:
                shutil.copyfile(path, os.path.join(folder, "tokenizer.model"))
                return _from_folder(folder)
        raise UserError(f"--gemma2_tokenizer {path}: no such file or folder")
    if model_folder and os.path.isdir(os.path.join(model_folder, "tokenizer")):
        return _from_folder(os.path.join(model_folder, "tokenizer"))
    return _from_hub()


def _from_hub():
    from transformers import GemmaTokenizerFast

    from library.models.hub_cache import cached_tokenizer_folder, hub_is_offline

    if hub_is_offline():
        return _from_folder(cached_tokenizer_folder(
            GEMMA_HUB_ID, TOKENIZER_FILES, "Gemma tokenizer",
            "pass --gemma2_tokenizer with a folder holding tokenizer.model or tokenizer.json (e.g. the tokenizer "
            "folder of a diffusers Lumina 2 model), or go online once to download it"))
    try:
        return right_padded(GemmaTokenizerFast.from_pretrained(GEMMA_HUB_ID, add_bos_token=True))
    except Exception as e:  # hub and network errors come in many types
        raise UserError(f"downloading the Gemma tokenizer {GEMMA_HUB_ID} failed ({e}); pass --gemma2_tokenizer") from e


def train_sentencepiece_gemma_tokenizer(folder: str, vocab_size: int = 500) -> str:
    """Train a small BPE sentencepiece model with Gemma's special pieces into `folder`/tokenizer.model."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS * 20), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, num_threads=1, byte_fallback=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", minloglevel=2,
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path
