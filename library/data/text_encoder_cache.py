"""Cached text-encoder outputs, with caption randomness kept alive and staleness detected.

Each image's caption is expanded into `--text_encoder_cache_variants N` caption variants: the
caption pipeline (shuffle, tag dropout, wildcards, keep tokens, prefix/suffix, trigger word) run
with N fixed random streams, caption dropout left out. All variants are encoded once, kept in
memory or written to `<image stem>_<family>_te.safetensors` (keys `v<i>.<conditioning key>`).
During training each sample draws its variant per epoch from the sample's random stream, and a
dropped caption uses the cached conditioning of the empty caption. sd-scripts refuses shuffle and
dropout with cached outputs; this keeps them.

A cache file is valid only if its metadata matches: format version, the family's encoder identity
(which encoders, token length, flags) and a hash of the exact variant texts, so editing a caption
or a caption option rebuilds that entry instead of training on stale conditioning. Writing our own
cache here because no library covers per-sample conditioning caches. The cache hands the dataset a
`TextSource` (`dataset.use_text_source`): each entry's `CachedText` and the empty caption's
conditioning. It never changes the entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from library.atomic_io import save_safetensors_atomic
from library.data.captions import process_caption
from library.errors import UserError

if TYPE_CHECKING:
    import torch

    from library.data.dataset import TrainDataset
    from library.data.image_entries import ImageEntry
    from library.training.modes import ModeKind

logger = logging.getLogger(__name__)

TEXT_CACHE_FORMAT_VERSION = "1"
ENCODE_BATCH_SIZE = 16
RANDOMIZING_OPTIONS = ("shuffle_caption", "caption_tag_dropout_rate", "enable_wildcard")


def add_text_encoder_cache_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text-encoder output caching")
    group.add_argument("--cache_text_encoder_outputs", action="store_true",
                       help="encode every caption once before training and keep the outputs in memory "
                            "(the text encoders are then not trained)")
    group.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                       help="like --cache_text_encoder_outputs, and keep them in files next to the images")
    group.add_argument("--text_encoder_cache_variants", type=int, default=None, metavar="N",
                       help="caption variants cached per image when shuffle_caption, tag dropout or "
                            "wildcards are on (default 1 without them, required above 1 with them)")
    group.add_argument("--text_encoder_cache_dir", default=None, metavar="DIR",
                       help="folder for text-encoder cache files (default: next to each image)")


def text_cache_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "cache_text_encoder_outputs", False)
                or getattr(args, "cache_text_encoder_outputs_to_disk", False))


def validate_text_cache_args(args: argparse.Namespace, kind: "ModeKind", denoiser_only_fallback: bool = False) -> None:
    """Reject flag combinations where cached outputs would silently change what trains (`kind`: the
    training mode's kind, library/training/modes.py). With `denoiser_only_fallback` (the family's
    text_cache_trains_denoiser_only), a LoRA run that did not ask for text-encoder training
    explicitly turns to --network_train_unet_only with one log line, as sd-scripts does there."""
    variants = getattr(args, "text_encoder_cache_variants", None)
    if not text_cache_requested(args):
        for flag in ("text_encoder_cache_variants", "text_encoder_cache_dir"):
            if getattr(args, flag, None) is not None:
                raise UserError(f"--{flag} needs --cache_text_encoder_outputs or --cache_text_encoder_outputs_to_disk")
        return
    if variants is not None and variants < 1:
        raise UserError(f"--text_encoder_cache_variants must be at least 1 (got {variants})")
    if denoiser_only_fallback and _may_drop_text_encoder_training(args, kind):
        logger.info("--cache_text_encoder_outputs: cached outputs cannot train the text encoders; training the "
                    "denoiser LoRA only (as with --network_train_unet_only, like sd-scripts)")
        args.network_train_unet_only = True
    if kind.trains_text_encoders(args):
        raise UserError("cached text-encoder outputs cannot train the text encoders: "
                        f"use {kind.text_encoder_off_switch}, or drop --cache_text_encoder_outputs")


def _may_drop_text_encoder_training(args: argparse.Namespace, kind: "ModeKind") -> bool:
    """A LoRA run that trains text encoders only by default (no --text_encoder_lr, not text-encoder-only)."""
    return (not kind.is_full_fine_tune and kind.trains_text_encoders(args) and args.text_encoder_lr is None
            and not args.network_train_text_encoder_only)


@dataclass
class TextCacheCounts:
    encoded: int = 0
    reused: int = 0


@dataclass
class CachedText:
    """One entry's caption variants and their conditioning: in memory, or in a cache file read per batch."""

    variants: list[str]
    outputs: Optional[list[dict]] = field(default=None, repr=False)
    path: Optional[str] = None

    def conditioning(self, variant: int) -> dict[str, "torch.Tensor"]:
        if self.outputs is not None:
            return self.outputs[variant]
        from safetensors import safe_open

        prefix = f"v{variant}."
        with safe_open(self.path, "pt") as f:
            return {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}


class TextSource:
    """What the text-encoder cache hands the dataset: each entry's CachedText by the dataset's entry
    id, and the conditioning of the empty caption (what a dropped caption trains with)."""

    def __init__(self, empty_conditioning: dict) -> None:
        self.empty_conditioning = empty_conditioning
        self._by_entry: dict[str, CachedText] = {}

    def add(self, entry_id: str, cached: CachedText) -> None:
        self._by_entry[entry_id] = cached

    def get(self, entry_id: str) -> Optional[CachedText]:
        return self._by_entry.get(entry_id)


def caption_variants(entry: "ImageEntry", count: int, max_train_steps: Optional[int]) -> list[str]:
    """The variant captions of an entry: fixed per caption text, independent of the training seed."""
    options = dataclasses.replace(entry.subset.captions, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
    randomizes = any(getattr(options, name) for name in RANDOMIZING_OPTIONS)
    return [process_caption(entry.caption, options, random.Random(f"te-variant:{index}:{entry.caption}"),
                            epoch=1, step=0, max_train_steps=max_train_steps)
            for index in range(count if randomizes else 1)]


def _variant_count(dataset: "TrainDataset", args: argparse.Namespace) -> int:
    subsets = [subset for spec in dataset.datasets for subset in spec.subsets]
    for subset in subsets:
        if subset.captions.token_warmup_step:
            raise UserError("token_warmup_step changes captions every step, so it cannot be used with cached "
                            "text-encoder outputs: remove one of them")
    randomizing = [name for subset in subsets for name in RANDOMIZING_OPTIONS if getattr(subset.captions, name)]
    requested = args.text_encoder_cache_variants
    if randomizing and (requested or 1) < 2:
        raise UserError(f"{randomizing[0]} makes a new caption every epoch; with cached text-encoder outputs set "
                        "--text_encoder_cache_variants N (N >= 2, e.g. 8) to cache N variants per caption")
    return requested or 1


def text_cache_path(entry: "ImageEntry", family_name: str, cache_dir: Optional[str]) -> str:
    stem = os.path.splitext(entry.image_path)[0]
    suffix = f"_{family_name}_te.safetensors"
    if cache_dir is None:
        return stem + suffix
    digest = hashlib.sha256(os.path.abspath(entry.image_path).encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir, f"{os.path.basename(stem)}_{digest}{suffix}")


def expected_metadata(identity: dict[str, str], texts: list[str]) -> dict[str, str]:
    return {
        "format_version": TEXT_CACHE_FORMAT_VERSION,
        "identity": json.dumps(identity, sort_keys=True),
        "variants": str(len(texts)),
        "captions_sha256": hashlib.sha256(json.dumps(texts).encode("utf-8")).hexdigest(),
    }


def is_text_cache_valid(path: str, metadata: dict[str, str]) -> bool:
    from safetensors import safe_open

    if not os.path.isfile(path):
        return False
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}) == metadata
    except Exception:  # a truncated or foreign file is stale, never an error
        return False


def _encode(texts: list[str], tokenize, encode, text_encoders: list, device) -> list[dict]:
    """Per-text conditioning dicts (CPU float tensors without the batch dimension)."""
    import torch

    outputs = []
    for start in range(0, len(texts), ENCODE_BATCH_SIZE):
        tokens = [{k: v.to(device) for k, v in part.items()} for part in tokenize.tokenize(texts[start:start + ENCODE_BATCH_SIZE])]
        with torch.no_grad():
            batch = encode.encode(text_encoders, tokens)
        for row in range(len(texts[start:start + ENCODE_BATCH_SIZE])):
            outputs.append({key: value[row].detach().to("cpu", torch.float32).clone() for key, value in batch.items()})
    return outputs


def _flatten(variants: list[dict]) -> dict:
    return {f"v{index}.{key}": tensor for index, conditioning in enumerate(variants) for key, tensor in conditioning.items()}


def cache_dataset_text_encoder_outputs(dataset: "TrainDataset", family, args: argparse.Namespace, components,
                                       device) -> TextCacheCounts:
    """Encode every caption variant (and the empty caption) once and hand the dataset a TextSource."""
    from tqdm.auto import tqdm

    strategy = family.text_encoder_outputs_caching_strategy(args, components)
    if strategy is None:
        raise UserError(f"{family.display_name} does not support cached text-encoder outputs")
    count = _variant_count(dataset, args)
    tokenize, encode = family.tokenize_strategy(args, components), family.text_encoding_strategy(args)
    encoders = components.text_encoders
    for encoder in encoders:
        encoder.eval()
    identity = strategy.cache_identity()
    source = TextSource(_encode([""], tokenize, encode, encoders, device)[0])
    counts = TextCacheCounts()
    to_disk = args.cache_text_encoder_outputs_to_disk
    if to_disk and args.text_encoder_cache_dir:
        os.makedirs(args.text_encoder_cache_dir, exist_ok=True)
    for entry in tqdm(dataset.entries, desc="caching text-encoder outputs", unit="img"):
        texts = caption_variants(entry, count, dataset.max_train_steps)
        path = text_cache_path(entry, family.name, args.text_encoder_cache_dir) if to_disk else None
        metadata = expected_metadata(identity, texts)
        if path and is_text_cache_valid(path, metadata):
            source.add(dataset.entry_id(entry), CachedText(texts, path=path))
            counts.reused += 1
            continue
        outputs = _encode(texts, tokenize, encode, encoders, device)
        counts.encoded += 1
        if path:
            save_safetensors_atomic(_flatten(outputs), path, metadata)
        source.add(dataset.entry_id(entry), CachedText(texts, outputs=None if path else outputs, path=path))
    dataset.use_text_source(source)
    logger.info("text-encoder outputs: %d entries encoded, %d reused from cache files (%d variants each)",
                counts.encoded, counts.reused, count)
    return counts
