"""The T5 tokenizer FLUX.1 (and SD3) need: from a local folder or `.model` file, a diffusers folder, or the hub.

No PyPI package ships the T5 vocabulary (transformers and sentencepiece ship none), so offline users point `--t5_tokenizer` at a
folder holding `spiece.model` or `tokenizer.json` (e.g. a diffusers FLUX folder's `tokenizer_2/`), or
at a sentencepiece `.model` file. Without it, a diffusers model folder's own `tokenizer_2` is used,
and otherwise `google/t5-v1_1-xxl`: from the Hugging Face cache when the hub is offline
(library/models/hub_cache.py), downloaded when it is online (library/models/sentencepiece_tokenizer.py's
`TokenizerSource` does the loading).
`train_sentencepiece_t5_tokenizer` trains a small sentencepiece model (tenths of a second) in T5's
conventions (pad 0, EOS 1, UNK 2, no BOS): tests and the tiny built-in FLUX model use it.
Loading a `.model` file needs the `protobuf` package (transformers converts it to a fast tokenizer).
"""

from __future__ import annotations

from typing import Optional

from library.models.sentencepiece_tokenizer import TokenizerSource, train_tiny_sentencepiece

T5_HUB_ID = "google/t5-v1_1-xxl"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
# captions like the ones users train on: enough distinct pieces for a few hundred-entry vocabulary
_TINY_CORPUS = (
    "a photo of a cat sitting on a red chair", "a painting of a blue square and a yellow circle",
    "portrait of a woman with long hair, detailed, high quality", "the quick brown fox jumps over the lazy dog",
    "a landscape with mountains, a lake and trees at sunset", "anime girl, smiling, white background",
    "a close up of a dog, shallow depth of field", "shape, triangle, green, simple drawing",
)


def _load(source: str, **kwargs):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(source, **kwargs)


T5_TOKENIZER = TokenizerSource("T5 tokenizer", "--t5_tokenizer", TOKENIZER_FILES, "tokenizer_2", "FLUX", T5_HUB_ID,
                               _load)


def load_t5_tokenizer(path: Optional[str] = None, model_folder: Optional[str] = None):
    """T5 tokenizer from --t5_tokenizer `path` (folder or .model file), a diffusers folder's tokenizer_2,
    or the hub; UserError naming the flag when none is available."""
    return T5_TOKENIZER.tokenizer(path, model_folder)


def train_sentencepiece_t5_tokenizer(folder: str, vocab_size: int = 256) -> str:
    """Train a small unigram sentencepiece model with T5's special ids into `folder`/spiece.model."""
    return train_tiny_sentencepiece(
        folder, "spiece.model", _TINY_CORPUS, vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
    )
