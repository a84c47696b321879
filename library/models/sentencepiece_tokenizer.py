"""Where a sentencepiece-based tokenizer (T5, Gemma-2) comes from, written once for every text encoder that needs one.

No PyPI package ships these vocabularies, so a `TokenizerSource` tries, in order: the folder or `.model` file the
user's flag names, the diffusers model folder's own tokenizer subfolder, then the hub id (from the Hugging Face cache
when the hub is offline, library/models/hub_cache.py). `train_tiny_sentencepiece` writes the small sentencepiece
models tests and the tiny built-in models use.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

from library.errors import UserError


@dataclass(frozen=True)
class TokenizerSource:
    """One tokenizer's flag, files and hub id; `load` is `from_pretrained(source, **kwargs)` of its class."""

    name: str  # "T5 tokenizer"
    flag: str  # "--t5_tokenizer"
    files: tuple[str, str]  # the sentencepiece model file, then tokenizer.json
    model_subfolder: str  # the diffusers model folder's subfolder holding it ("tokenizer_2")
    model_kind: str  # whose diffusers folder, for the offline hint ("FLUX")
    hub_id: str
    load: Callable

    def tokenizer(self, path: Optional[str] = None, model_folder: Optional[str] = None):
        """From the flag's `path` (folder or .model file), `model_folder`'s subfolder, or the hub; UserError naming
        the flag when none is available."""
        if path:
            return self._from_flag(path)
        if model_folder and os.path.isdir(os.path.join(model_folder, self.model_subfolder)):
            return self.from_folder(os.path.join(model_folder, self.model_subfolder))
        return self.from_hub()

    def _from_flag(self, path: str):
        if os.path.isdir(path):
            if not any(os.path.isfile(os.path.join(path, name)) for name in self.files):
                raise UserError(f"{self.flag} {path}: the folder has neither {self.files[0]} nor {self.files[1]}")
            return self.from_folder(path)
        if os.path.isfile(path):
            if not path.endswith(".model"):
                raise UserError(f"{self.flag} {path}: pass a folder or a sentencepiece .model file")
            with tempfile.TemporaryDirectory() as folder:
                shutil.copyfile(path, os.path.join(folder, self.files[0]))
                return self.from_folder(folder)
        raise UserError(f"{self.flag} {path}: no such file or folder")

    def from_folder(self, folder: str):
        try:
            return self.load(folder, local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise UserError(f"cannot load a {self.name} from {folder}: {e}") from e

    def from_hub(self):
        from library.models.hub_cache import cached_tokenizer_folder, hub_is_offline

        if hub_is_offline():
            return self.from_folder(cached_tokenizer_folder(
                self.hub_id, self.files, self.name,
                f"pass {self.flag} with a folder holding {self.files[0]} or {self.files[1]} (e.g. the "
                f"{self.model_subfolder} folder of a diffusers {self.model_kind} model), or go online once to "
                "download it"))
        try:
            return self.load(self.hub_id)
        except Exception as e:  # hub and network errors come in many types
            raise UserError(f"downloading the {self.name} {self.hub_id} failed ({e}); pass {self.flag}") from e


def train_tiny_sentencepiece(folder: str, file_name: str, corpus: tuple[str, ...], vocab_size: int,
                             **conventions) -> str:
    """Train a small sentencepiece model on `corpus` into `folder`/`file_name`; `conventions` are the tokenizer's
    model type and special ids and pieces (SentencePieceTrainer options)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20), model_writer=model, vocab_size=vocab_size, character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, minloglevel=2, **conventions,
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file_name)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path
