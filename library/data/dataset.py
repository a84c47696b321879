"""The training dataset: resolved dataset specs to deterministic epochs of batches.

Owns `TrainDataset` (all images of all datasets, with their buckets), the order of each epoch
(`batches_for_epoch`: a pure function of seed and epoch, so a resumed run skips the first k batches
and sees exactly the batches an uninterrupted run would), assembling one batch (`make_batch`: pixels
or cached latents, captions through the caption pipeline, SDXL-style size conditioning, loss weights
and alpha masks), `EpochLoader` to feed a torch DataLoader, and the latent-caching and data-loading
command-line flags. Epochs are 1-based, as in `library.data.captions.process_caption`. The two caches hand the
dataset a source object it holds (`use_latent_source`, `use_text_source`): it asks them for an
entry's latents or caption conditioning by `entry_id` and never imports the cache modules.

Every random choice for one sample (flip, crop, colour jitter, caption) comes from a
`random.Random` seeded by (seed, epoch, image path, dataset, repeat), so it is the same whether or
not latents are cached, in whichever worker process the batch is built.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from collections import defaultdict
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

from library.config.dataset_spec import DatasetGroupSpec, DatasetSpec
from library.data.buckets import BucketManager
from library.data.captions import is_caption_dropped, process_caption
from library.data.image_entries import (
    ImageEntry,
    SkipReport,
    SubsetScanner,
    balance_regularization,
    subset_label,
)
from library.data.images import ImageLoadError, prepare_image
from library.data.loss_masks import load_entry_image
from library.errors import UserError

if TYPE_CHECKING:
    import torch

    from library.data.latent_cache import CachedLatents, LatentSource
    from library.data.text_encoder_cache import CachedText, TextSource

logger = logging.getLogger(__name__)


class SampleRef(NamedTuple):
    """One sample of an epoch: an entry and which of its repeats this is."""

    entry_index: int
    repeat: int


def _bucket_manager(spec: DatasetSpec) -> BucketManager:
    return BucketManager(
        spec.resolution, spec.enable_bucket, spec.min_bucket_reso, spec.max_bucket_reso,
        spec.bucket_reso_steps, spec.bucket_no_upscale,
    )


class TrainDataset:
    """All training (and regularisation) images of a run, grouped per dataset and bucket."""

    def __init__(
        self,
        datasets: list[DatasetSpec],
        scanned_entries: list[ImageEntry],
        seed: int,
        prior_loss_weight: float = 1.0,
        max_train_steps: Optional[int] = None,
        source: str = "<command line>",
    ) -> None:
        self.datasets = datasets
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.max_train_steps = max_train_steps
        self.source = source
        self._scanned = scanned_entries
        self.entries: list[ImageEntry] = []
        self._batches_cache: tuple[int, list[list[SampleRef]]] | None = None  # (epoch, its batches)
        # batches hold batch_size * num_processes samples, split among the processes by the trainer
        self.num_processes = 1
        self.latent_source: Optional["LatentSource"] = None  # handed over by the latent cache
        self.text_source: Optional["TextSource"] = None  # handed over by the text-encoder output cache
        self._rebalance()

    @classmethod
    def from_spec(
        cls,
        spec: DatasetGroupSpec,
        seed: int,
        prior_loss_weight: float = 1.0,
        max_train_steps: Optional[int] = None,
    ) -> "TrainDataset":
        dataset = cls(spec.datasets, scan_entries(spec), seed, prior_loss_weight, max_train_steps, spec.source)
        dataset.log_summary()
        return dataset

    # ------------------------------------------------------------ contents

    def _rebalance(self) -> None:
        """Regularisation balancing per dataset; UserError when no training image is left."""
        entries = []
        for index in range(len(self.datasets)):
            entries.extend(balance_regularization([e for e in self._scanned if e.dataset_index == index]))
        if not any(not entry.is_reg for entry in entries):
            folders = sorted({subset_label(s) for d in self.datasets for s in d.subsets})
            raise UserError(
                f"no usable training images in {', '.join(folders) or 'the dataset'} (from {self.source}): "
                "add .png/.jpg/.jpeg/.webp/.bmp images, or fix the paths (regularisation images alone cannot train)"
            )
        self.entries = entries
        self._batches_cache = None

    def drop_entries(self, dropped: list[ImageEntry]) -> None:
        """Remove images found unreadable after the scan (e.g. while caching); re-balances."""
        dropped_ids = {id(entry) for entry in dropped}
        self._scanned = [entry for entry in self._scanned if id(entry) not in dropped_ids]
        self._rebalance()

    def batch_size(self, dataset_index: int) -> int:
        return self.datasets[dataset_index].batch_size

    def num_samples_per_epoch(self) -> int:
        return sum(entry.num_repeats for entry in self.entries)

    def num_batches_per_epoch(self) -> int:
        return len(self.batches_for_epoch(1))

    @property
    def is_latent_cached(self) -> bool:
        return bool(self.entries) and all(self.cached_latents(entry) is not None for entry in self.entries)

    # ------------------------------------------------------------ caches

    def entry_id(self, entry: ImageEntry) -> str:
        """dataset:subset:image path inside the subset's folder - what the caches key an entry by
        (stable across worker processes and independent of where the dataset folder lives)."""
        subsets = self.datasets[entry.dataset_index].subsets
        subset_index = next(i for i, subset in enumerate(subsets) if subset is entry.subset)
        folder = entry.subset.image_dir
        name = os.path.relpath(entry.image_path, folder) if folder else os.path.basename(entry.image_path)
        return f"{entry.dataset_index}:{subset_index}:{name}"

    def use_latent_source(self, source: "LatentSource") -> None:
        self.latent_source = source

    def use_text_source(self, source: "TextSource") -> None:
        self.text_source = source

    def cached_latents(self, entry: ImageEntry) -> Optional["CachedLatents"]:
        return self.latent_source.get(self.entry_id(entry)) if self.latent_source is not None else None

    def cached_text(self, entry: ImageEntry) -> Optional["CachedText"]:
        return self.text_source.get(self.entry_id(entry)) if self.text_source is not None else None

    def log_summary(self) -> None:
        for index, spec in enumerate(self.datasets):
            entries = [e for e in self.entries if e.dataset_index == index]
            buckets = defaultdict(int)
            for entry in entries:
                buckets[entry.bucket_wh] += entry.num_repeats
            train = sum(1 for e in entries if not e.is_reg)
            logger.info(
                "dataset %d: %d images (%d regularisation), %d samples per epoch, batch size %d, buckets %s",
                index, len(entries), len(entries) - train, sum(buckets.values()), spec.batch_size,
                ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items())),
            )

    def validate_for_latent_caching(self) -> None:
        """UserError for options that need fresh pixels every step (cached latents are fixed)."""
        for spec in self.datasets:
            for subset in spec.subsets:
                for option in ("color_aug", "random_crop"):
                    if getattr(subset, option):
                        raise UserError(
                            f"{option} changes the pixels every step, so it cannot be used with --cache_latents/"
                            f"--cache_latents_to_disk (subset {subset_label(subset)} in {self.source}): "
                            f"remove {option} or the latent caching flags"
                        )

    # ------------------------------------------------------------ epochs

    def batches_for_epoch(self, epoch: int) -> list[list[SampleRef]]:
        """The epoch's batches: per dataset and bucket, shuffled samples chunked by the batch size (times
        num_processes: each batch is then shared among the processes by the trainer),
        then all batches shuffled. Depends only on (seed, epoch) and the entries."""
        if self._batches_cache is not None and self._batches_cache[0] == epoch:
            return self._batches_cache[1]
        rng = random.Random(f"batches:{self.seed}:{epoch}")
        by_bucket: dict[tuple, list[SampleRef]] = defaultdict(list)
        for index, entry in enumerate(self.entries):
            key = (entry.dataset_index, entry.bucket_wh)
            by_bucket[key].extend(SampleRef(index, repeat) for repeat in range(entry.num_repeats))
        batches = []
        for key in sorted(by_bucket):
            refs = by_bucket[key]
            rng.shuffle(refs)
            size = self.batch_size(key[0]) * self.num_processes
            batches.extend(refs[start:start + size] for start in range(0, len(refs), size))
        rng.shuffle(batches)
        self._batches_cache = (epoch, batches)
        return batches

    def _sample_rng(self, epoch: int, ref: SampleRef) -> random.Random:
        """Data-side randomness of one sample (flip, crop, caption shuffle and dropout), keyed like the
        noise by the sample's location-independent key: a moved dataset folder trains the same."""
        entry = self.entries[ref.entry_index]
        return random.Random(f"sample:{self.seed}:{epoch}:{self._sample_key(entry, ref.repeat)}")

    # ------------------------------------------------------------ batches

    def make_batch(self, refs: list[SampleRef], epoch: int, global_step: int) -> dict:
        """One batch, all samples from one bucket. Keys:

        "captions" list[str] (after the caption pipeline), "loss_weights" [B] (prior_loss_weight for
        regularisation images), "image_paths" list[str], "sample_keys" list[str] (dataset, image and
        repeat of each sample, which keys its noise), "original_sizes_hw", "crop_top_lefts" and
        "target_sizes_hw" LongTensor [B, 2], then "latents" [B, C, h, w] when cached or "images"
        [B, 3, H, W] in [-1, 1], and "alpha_masks" [B, 1, H, W] when a subset uses a loss mask
        (alpha_mask or conditioning_data_dir; ones for images without one). Images that fail to load
        now (damaged after the scan) are left out with a warning.
        """
        import torch

        samples = []
        for ref in refs:
            sample = self._make_sample(ref, epoch, global_step)
            if sample is not None:
                samples.append(sample)
        if not samples:
            paths = ", ".join(self.entries[ref.entry_index].image_path for ref in refs)
            raise UserError(f"none of the images of a batch could be read ({paths}): check or remove these files")
        batch = {
            "captions": [s["caption"] for s in samples],
            "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
            "image_paths": [s["image_path"] for s in samples],
            "sample_keys": [s["sample_key"] for s in samples],
            "original_sizes_hw": torch.tensor([s["original_size_hw"] for s in samples], dtype=torch.long),
            "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
            "target_sizes_hw": torch.tensor([s["target_size_hw"] for s in samples], dtype=torch.long),
        }
        if "conditioning" in samples[0]:
            batch["conditioning"] = {key: torch.stack([s["conditioning"][key] for s in samples])
                                     for key in samples[0]["conditioning"]}
        pixel_key = "latents" if "latents" in samples[0] else "images"
        if any(pixel_key not in s for s in samples):
            raise RuntimeError("a batch mixes cached latents and images: cache the latents of every entry")
        batch[pixel_key] = torch.stack([s[pixel_key] for s in samples])
        if any(self.entries[ref.entry_index].subset.uses_loss_mask for ref in refs):
            height, width = samples[0]["target_size_hw"]
            batch["alpha_masks"] = torch.stack([
                s["alpha"] if s["alpha"] is not None else torch.ones(1, height, width) for s in samples
            ])
        return batch

    def _make_sample(self, ref: SampleRef, epoch: int, global_step: int) -> Optional[dict]:
        entry = self.entries[ref.entry_index]
        subset = entry.subset
        rng = self._sample_rng(epoch, ref)
        flip = subset.flip_aug and rng.random() < 0.5
        cached_latents = self.cached_latents(entry)
        if cached_latents is not None:
            sample = self._cached_sample(entry, cached_latents, flip)
        else:
            sample = self._image_sample(entry, flip, rng)
            if sample is None:
                return None
        cached_text = self.cached_text(entry)
        if cached_text is not None:
            sample["caption"], sample["conditioning"] = self._cached_conditioning(entry, cached_text, rng, epoch)
        else:
            sample["caption"] = process_caption(entry.caption, subset.captions, rng, epoch, global_step,
                                                self.max_train_steps)
        sample["loss_weight"] = self.prior_loss_weight if entry.is_reg else 1.0
        sample["image_path"] = entry.image_path
        sample["sample_key"] = self._sample_key(entry, ref.repeat)
        sample["target_size_hw"] = (entry.bucket_wh[1], entry.bucket_wh[0])
        if not subset.uses_loss_mask:
            sample["alpha"] = None
        return sample

    def _cached_conditioning(self, entry: ImageEntry, cached: "CachedText", rng: random.Random,
                             epoch: int) -> tuple[str, dict]:
        """Caption dropout picks the cached empty-caption conditioning, else this epoch's variant."""
        if is_caption_dropped(entry.subset.captions, rng, epoch):
            return "", self.text_source.empty_conditioning
        variant = rng.randrange(len(cached.variants))
        return cached.variants[variant], cached.conditioning(variant)

    def _sample_key(self, entry: ImageEntry, repeat: int) -> str:
        """entry_id:repeat - names a sample independently of where the dataset folder lives (the
        trainer keys each sample's noise by it)."""
        return f"{self.entry_id(entry)}:{repeat}"

    def _image_sample(self, entry: ImageEntry, flip: bool, rng: random.Random) -> Optional[dict]:
        try:
            image = load_entry_image(entry)
        except ImageLoadError as e:
            logger.warning("leaving %s out of its batch: %s", entry.image_path, e.reason)
            return None
        subset = entry.subset
        resized = entry.resized_wh if image.size == tuple(entry.image_size_wh) else None
        prepared = prepare_image(image, entry.bucket_wh, subset.random_crop, rng, flip, resized_wh=resized,
                                 color_aug=subset.color_aug, interpolation=subset.resize_interpolation)
        return {
            "images": prepared.pixels, "alpha": prepared.alpha,
            "original_size_hw": prepared.original_size_hw, "crop_top_left": prepared.crop_top_left,
        }

    def _cached_sample(self, entry: ImageEntry, cached: "CachedLatents", flip: bool) -> dict:
        import torch

        latents, alpha = cached.load(flip)
        if flip and latents is None:
            raise RuntimeError(f"flip_aug needs flipped latents for {entry.image_path}: re-run latent caching")
        if alpha is not None and flip:
            alpha = torch.flip(alpha, dims=[-1])
        plan = entry.center_crop()
        return {
            "latents": latents, "alpha": alpha,
            "original_size_hw": (entry.image_size_wh[1], entry.image_size_wh[0]),
            "crop_top_left": plan.crop_top_left(entry.bucket_wh, flip),
        }


def scan_entries(spec: DatasetGroupSpec) -> list[ImageEntry]:
    """Every image entry of every subset of `spec` (unreadable images reported and left out)."""
    report = SkipReport()
    scanned: list[ImageEntry] = []
    for index, dataset in enumerate(spec.datasets):
        scanner = SubsetScanner(index, _bucket_manager(dataset), report)
        for subset in dataset.subsets:
            scanned.extend(scanner.scan(subset))
    report.log_summary()
    return scanned


def _step_zero(batch_index: int) -> int:
    return 0


class EpochLoader:
    """One epoch's batches as a map-style dataset for `torch.utils.data.DataLoader(batch_size=None)`.

    Item i is `make_batch` of batch `start_batch + i` of this loader's batch list (the epoch's
    batches, or the list given: one process's shares). `global_step_of_batch(k)` gives the optimizer
    step count in force when the k-th batch of that list is trained (for token warmup).
    """

    def __init__(
        self,
        dataset: TrainDataset,
        epoch: int,
        start_batch: int = 0,
        global_step_of_batch: Optional[Callable[[int], int]] = None,
        batches: Optional[list[list[SampleRef]]] = None,
    ) -> None:
        self.dataset = dataset
        self.epoch = epoch
        self.start_batch = start_batch
        self.global_step_of_batch = global_step_of_batch or _step_zero
        self.batches = batches if batches is not None else dataset.batches_for_epoch(epoch)
        if not 0 <= start_batch <= len(self.batches):
            raise ValueError(f"start_batch {start_batch} outside the epoch's {len(self.batches)} batches")

    def __len__(self) -> int:
        return len(self.batches) - self.start_batch

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        batch_index = self.start_batch + index
        return self.dataset.make_batch(self.batches[batch_index], self.epoch, self.global_step_of_batch(batch_index))


def add_caching_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("latent caching")
    group.add_argument("--cache_latents", action="store_true",
                       help="encode all images with the VAE once before training and keep the latents in memory")
    group.add_argument("--cache_latents_to_disk", action="store_true",
                       help="like --cache_latents, but store them in safetensors files reused by later runs")
    group.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE call while caching (default: 1)")
    group.add_argument("--skip_cache_check", action="store_true",
                       help="reuse existing latent cache files without checking that they match the images")
    group.add_argument("--latents_cache_dir", default=None, metavar="DIR",
                       help="folder for latent cache files (default: next to each image)")


def add_data_loading_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data loading")
    group.add_argument("--max_data_loader_n_workers", type=int, default=0,
                       help="worker processes that build batches (default: 0 = in the training process)")
    group.add_argument("--prior_loss_weight", type=float, default=1.0,
                       help="loss weight of regularisation images (default: 1.0)")
    group.add_argument("--masked_loss", action="store_true",
                       help="weight the loss per pixel by mask images in each subset's conditioning_data_dir (red "
                            "channel; alpha_mask masks apply with or without this flag)")
