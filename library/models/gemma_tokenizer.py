"""The Gemma-2 tokenizer Lumina Image 2.0 needs: from a local folder or `.model` file, a diffusers folder, or the hub.

Like T5 (library/models/t5_tokenizer.py), no PyPI package ships Gemma's vocabulary (the model is gated on the hub), so
offline users point `--gemma2_tokenizer` at a folder holding `tokenizer.model` or `tokenizer.json`
(e.g. a diffusers Lumina 2 folder's `tokenizer/`) or at a sentencepiece `.model` file. Without it a
diffusers folder's own `tokenizer/` is used, else `google/gemma-2-2b` (from the Hugging Face cache when
the hub is offline, library/models/hub_cache.py); library/models/sentencepiece_tokenizer.py's `TokenizerSource`
loads it.
`train_sentencepiece_gemma_tokenizer` trains a small sentencepiece model in Gemma's conventions
(pad 0, eos 1, bos 2, unk 3; a BOS is prepended) for tests and the tiny built-in Lumina 2.
"""

from __future__ import annotations

from typing import Optional

from library.models.sentencepiece_tokenizer import TokenizerSource, train_tiny_sentencepiece

GEMMA_HUB_ID = "google/gemma-2-2b"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_TINY_CORPUS = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts. <Prompt Start> a photo of a cat",
    "a painting of a blue square and a yellow circle", "portrait of a woman with long hair, high quality",
    "the quick brown fox jumps over the lazy dog", "a landscape with mountains, a lake and trees at sunset",
    "anime girl, smiling, white background", "shape, triangle, green, red, simple drawing",
)


def right_padded(tokenizer):
    """Lumina 2 reads the caption's valid tokens first (its rotary positions and refiner mask assume
    right padding, as sd-scripts sets it); Gemma's own configs pad on the left."""
    tokenizer.padding_side = "right"
    return tokenizer


def _load(source: str, **kwargs):
    from transformers import GemmaTokenizerFast

    return right_padded(GemmaTokenizerFast.from_pretrained(source, add_bos_token=True, **kwargs))


GEMMA_TOKENIZER = TokenizerSource("Gemma tokenizer", "--gemma2_tokenizer", TOKENIZER_FILES, "tokenizer", "Lumina 2",
                                  GEMMA_HUB_ID, _load)


def load_gemma_tokenizer(path: Optional[str] = None, model_folder: Optional[str] = None):
    """Gemma tokenizer from --gemma2_tokenizer `path` (folder or .model file), a diffusers folder's
    tokenizer/, or the hub; UserError naming the flag when none is available."""
    return GEMMA_TOKENIZER.tokenizer(path, model_folder)


def train_sentencepiece_gemma_tokenizer(folder: str, vocab_size: int = 500) -> str:
    """Train a small BPE sentencepiece model with Gemma's special pieces into `folder`/tokenizer.model."""
    return train_tiny_sentencepiece(
        folder, "tokenizer.model", _TINY_CORPUS, vocab_size, model_type="bpe", byte_fallback=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>",
    )
