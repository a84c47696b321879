"""Builds the real CLIP BPE tokenizer offline.

The CLIP vocabulary (byte-level BPE, 49,408 entries) ships inside the `open-clip-torch` wheel as
`open_clip/bpe_simple_vocab_16e6.txt.gz`. We read that file without importing open_clip (whose
imports pull torchvision) and build a transformers `CLIPTokenizer` from it, so SD/SDXL/FLUX/SD3 work
without a model hub. The result tokenizes exactly like `openai/clip-vit-large-patch14`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

from library.errors import UserError

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGE_COUNT = 49152 - 256 - 2


def _bpe_file_path() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the CLIP vocabulary is missing: install it with `pip install --no-deps open-clip-torch` "
            "(it only ships the vocabulary file we read)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], CLIP_VOCAB_FILE)


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte-to-printable-character table, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(_bpe_file_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGE_COUNT + 1]]
    byte_chars = bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """CLIP-L tokenizer (pads with <|endoftext|>); SDXL's second tokenizer passes pad_token="!"."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tokenizer.model_max_length = model_max_length
    return tokenizer
