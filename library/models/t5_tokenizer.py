"""The T5 tokenizer FLUX.1 (and SD3) need: from a local folder or `.model` file, a diffusers folder, or the hub.

No PyPI package ships the T5 vocabulary (transformers and sentencepiece ship none), so offline users point `--t5_tokenizer` at a
folder holding `spiece.model` or `tokenizer.json` (e.g. a diffusers FLUX folder's `tokenizer_2/`), or
at a sentencepiece `.model` file. Without it, a diffusers model folder's own `tokenizer_2` is used,
and otherwise `google/t5-v1_1-xxl`: from the Hugging Face cache when the hub is offline
(library/models/hub_cache.py), downloaded when it is online.
`train_sentencepiece_t5_tokenizer` trains a small sentencepiece model (tenths of a second) in T5's
conventions (pad 0, EOS 1, UNK 2, no BOS): tests and the tiny built-in FLUX model use it.
Loading a `.model` file needs the `protobuf` package (transformers converts it to a fast tokenizer).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Optional

from library.errors import UserError

T5_HUB_ID = "google/t5-v1_1-xxl"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
# captions like the ones users train on: enough distinct pieces for a few hundred-entry vocabulary
_TINY_CORPUS = (
    "a photo of a cat sitting on a red chair", "a painting of a blue square and a yellow circle",
    "portrait of a woman with long hair, detailed, high quality", "the quick brown fox jumps over the lazy dog",
    "a landscape with mountains, a lake and trees at sunset", "anime girl, smiling, white background",
    "a close up of a dog, shallow depth of field", "shape, triangle, green, simple drawing",
)


def _from_folder(folder: str):
    from transformers import T5TokenizerFast

    try:
        return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load a T5 tokenizer from {folder}: {e}") from e


def load_t5_tokenizer(path: Optional[str] = None, model_folder: Optional[str] = None):
    """T5 tokenizer from --t5_tokenizer `path` (folder or .model file), a diffusers folder's tokenizer_2,
    or the hub; UserError naming the flag when none is available."""
    if path:
        if os.path.isdir(path):
            if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
                raise UserError(f"--t5_tokenizer {path}: the folder has neither spiece.model nor tokenizer.json")
            return _from_folder(path)
        if os.path.isfile(path):
            if not path.endswith(".model"):
                raise UserError(f"--t5_tokenizer {path}: pass a folder or a sentencepiece .model file")
            with tempfile.TemporaryDirectory() as folder:
                shutil.copyfile(path, os.path.join(folder, "spiece.model"))
                return _from_folder(folder)
        raise UserError(f"--t5_tokenizer {path}: no such file or folder")
    if model_folder and os.path.isdir(os.path.join(model_folder, "tokenizer_2")):
        return _from_folder(os.path.join(model_folder, "tokenizer_2"))
    return _from_hub()


def _from_hub():
    from transformers import T5TokenizerFast

    from library.models.hub_cache import cached_tokenizer_folder, hub_is_offline

    if hub_is_offline():
        return _from_folder(cached_tokenizer_folder(
            T5_HUB_ID, TOKENIZER_FILES, "T5 tokenizer",
            "pass --t5_tokenizer with a folder holding spiece.model or tokenizer.json (e.g. the tokenizer_2 folder "
            "of a diffusers FLUX model), or go online once to download it"))
    try:
        return T5TokenizerFast.from_pretrained(T5_HUB_ID)
    except Exception as e:  # hub and network errors come in many types
        raise UserError(f"downloading the T5 tokenizer {T5_HUB_ID} failed ({e}); pass --t5_tokenizer") from e


def train_sentencepiece_t5_tokenizer(folder: str, vocab_size: int = 256) -> str:
    """Train a small unigram sentencepiece model with T5's special ids into `folder`/spiece.model."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS * 20), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2,
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "spiece.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path
