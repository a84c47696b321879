"""Latent cache files: encoding a dataset's images with the VAE once, and knowing when that is stale.

Our own format (no library does this): one safetensors file per image and bucket, next to the image
as `<stem>_<WWWW>x<HHHH>_<family>.safetensors` or, with a cache folder, as
`<stem>_<hash of the image path>_<WWWW>x<HHHH>_<family>.safetensors` there (the hash keeps images of
the same name in different folders apart). Tensors: "latents" [C, h, w], "latents_flipped" (made
when a subset uses flip_aug; the flipped image is encoded, not the latents flipped) and "alpha_mask"
[1, H, W] (with a loss mask: alpha_mask or conditioning_data_dir; flipped when loaded). The metadata records everything the latents
depend on (format version, the strategy's cache identity such as family and latent channels,
bucket, resize filter (`resize_interpolation`), resize and crop, the source file's size and mtime,
and the loss-mask file's); any difference, a missing tensor or an unreadable file makes the file
stale and it is rebuilt, never silently used.

The cache hands the dataset a `LatentSource` (`dataset.use_latent_source`): each entry's
`CachedLatents`, tensors in memory or the file read per batch. It never changes the entries.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from library.atomic_io import save_safetensors_atomic
from library.data.image_entries import ImageEntry
from library.data.images import ImageLoadError, prepare_image
from library.data.loss_masks import load_entry_image, mask_identity
from library.errors import UserError

if TYPE_CHECKING:
    import torch

    from library.data.dataset import TrainDataset
    from library.strategies import LatentsCachingStrategy

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "1"


@dataclass
class CacheCounts:
    encoded: int = 0  # images encoded by the VAE in this call
    reused: int = 0  # valid cache files used as they were
    skipped: int = 0  # images unreadable while caching, left out of the dataset


def cache_file_path(entry: ImageEntry, strategy: "LatentsCachingStrategy", cache_dir: Optional[str] = None) -> str:
    width, height = entry.bucket_wh
    suffix = f"_{width:04d}x{height:04d}_{strategy.family}.safetensors"
    stem = os.path.splitext(entry.image_path)[0]
    if cache_dir is None:
        return stem + suffix
    digest = hashlib.sha256(os.path.abspath(entry.image_path).encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir, f"{os.path.basename(stem)}_{digest}{suffix}")


def expected_metadata(entry: ImageEntry, strategy: "LatentsCachingStrategy") -> dict[str, str]:
    """The metadata a valid cache file of this entry holds (apart from the flip/alpha flags)."""
    stat = os.stat(entry.image_path)
    plan = entry.center_crop()
    identity = strategy.cache_identity()
    return {
        "format_version": CACHE_FORMAT_VERSION,
        **identity,
        "identity_keys": ",".join(sorted(identity)),
        "bucket": f"{entry.bucket_wh[0]}x{entry.bucket_wh[1]}",
        "original_size": f"{entry.image_size_wh[0]}x{entry.image_size_wh[1]}",
        "resized_size": f"{plan.resized_wh[0]}x{plan.resized_wh[1]}",
        "resize_interpolation": entry.subset.resize_interpolation or "default",
        "crop_left_top": f"{plan.left},{plan.top}",
        "source_size": str(stat.st_size),
        "source_mtime_ns": str(stat.st_mtime_ns),
        **mask_identity(entry),
    }


def _read_header(path: str) -> Optional[tuple[dict, set, list]]:
    """(metadata, tensor names, shape of "latents") or None when the file cannot be parsed."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            shape = list(f.get_slice("latents").get_shape()) if "latents" in names else []
            return f.metadata() or {}, names, shape
    except Exception:  # safetensors raises several types for damaged files; all mean "rebuild it"
        return None


def is_cache_valid(
    path: str,
    entry: ImageEntry,
    strategy: "LatentsCachingStrategy",
    need_flip: bool,
    need_alpha: Optional[bool] = None,
) -> bool:
    """True only if the file exists, parses, holds the needed tensors and all its metadata matches."""
    if need_alpha is None:
        need_alpha = entry.subset.uses_loss_mask
    if not os.path.isfile(path):
        return False
    header = _read_header(path)
    if header is None:
        return False
    metadata, names, shape = header
    try:
        expected = expected_metadata(entry, strategy)
    except OSError:
        return False
    if any(metadata.get(key) != value for key, value in expected.items()):
        return False
    scale = strategy.vae_scale_factor
    if shape != [strategy.latent_channels, entry.bucket_wh[1] // scale, entry.bucket_wh[0] // scale]:
        return False
    if need_flip and "latents_flipped" not in names:
        return False
    return not (need_alpha and "alpha_mask" not in names)


def load_cached_latents(path: str, flipped: bool) -> tuple["torch.Tensor", Optional["torch.Tensor"]]:
    """(latents or flipped latents, alpha mask as stored - not flipped - or None)."""
    from safetensors import safe_open

    key = "latents_flipped" if flipped else "latents"
    try:
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            if key not in names:
                raise UserError(f"latent cache file {path} has no {key!r}: run latent caching again without --skip_cache_check")
            alpha = f.get_tensor("alpha_mask") if "alpha_mask" in names else None
            return f.get_tensor(key), alpha
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"latent cache file {path} cannot be read ({e}): delete it and cache the latents again") from e


@dataclass
class _CacheJob:
    """One (image, bucket): every entry that shares it gets the same latents."""

    entries: list[ImageEntry]
    path: Optional[str]
    need_flip: bool = False
    need_alpha: bool = False

    @property
    def entry(self) -> ImageEntry:
        return self.entries[0]


@dataclass
class CachedLatents:
    """One image's latents at one bucket: tensors in memory (--cache_latents) or the cache file they
    are read from for each batch (--cache_latents_to_disk)."""

    path: Optional[str] = None
    latents: Optional["torch.Tensor"] = field(default=None, repr=False)
    latents_flipped: Optional["torch.Tensor"] = field(default=None, repr=False)
    alpha_mask: Optional["torch.Tensor"] = field(default=None, repr=False)

    def load(self, flipped: bool) -> tuple[Optional["torch.Tensor"], Optional["torch.Tensor"]]:
        """(latents or flipped latents - None when not cached -, alpha mask as stored or None)."""
        if self.path is not None:
            return load_cached_latents(self.path, flipped)
        return (self.latents_flipped if flipped else self.latents), self.alpha_mask


class LatentSource:
    """What the latent cache hands the dataset: the cached latents of each entry, by the dataset's
    entry id (entries that share an image and bucket share one CachedLatents)."""

    def __init__(self) -> None:
        self._by_entry: dict[str, CachedLatents] = {}

    def add(self, entry_ids: list[str], cached: CachedLatents) -> None:
        for entry_id in entry_ids:
            self._by_entry[entry_id] = cached

    def get(self, entry_id: str) -> Optional[CachedLatents]:
        return self._by_entry.get(entry_id)


def _jobs_for(entries: list[ImageEntry], strategy, to_disk: bool, cache_dir: Optional[str]) -> list[_CacheJob]:
    by_key: dict[tuple, list[ImageEntry]] = {}
    for entry in entries:
        by_key.setdefault((os.path.abspath(entry.image_path), entry.bucket_wh, entry.resized_wh), []).append(entry)
    jobs = []
    for group in by_key.values():
        path = cache_file_path(group[0], strategy, cache_dir) if to_disk else None
        jobs.append(_CacheJob(group, path, need_flip=any(e.subset.flip_aug for e in group),
                              need_alpha=any(e.subset.uses_loss_mask for e in group)))
    return jobs


def _is_reusable(job: _CacheJob, strategy, skip_cache_check: bool) -> bool:
    if skip_cache_check:
        return os.path.isfile(job.path)
    return is_cache_valid(job.path, job.entry, strategy, job.need_flip, job.need_alpha)


def use_existing_cache_files(
    dataset: "TrainDataset", strategy: "LatentsCachingStrategy", *, cache_dir: Optional[str], skip_cache_check: bool
) -> bool:
    """Hand the dataset a LatentSource of cache files if EVERY entry has a valid one (then no VAE is
    needed); returns False, handing nothing over, as soon as one image would need encoding."""
    jobs = _jobs_for(dataset.entries, strategy, True, cache_dir)
    if not all(_is_reusable(job, strategy, skip_cache_check) for job in jobs):
        return False
    source = LatentSource()
    for job in jobs:
        source.add(_entry_ids(dataset, job), CachedLatents(path=job.path))
    dataset.use_latent_source(source)
    logger.info("latents: 0 images encoded, %d reused from cache files", len(jobs))
    return True


def cache_dataset_latents(
    dataset: "TrainDataset",
    strategy: "LatentsCachingStrategy",
    vae: Any,
    *,
    to_disk: bool,
    batch_size: int,
    device,
    dtype,
    skip_cache_check: bool = False,
    cache_dir: Optional[str] = None,
) -> CacheCounts:
    """Cache every entry's latents in memory or in (reused or new) files; the dataset gets a LatentSource.

    The VAE must already be on `device` in eval mode. Images are encoded bucket by bucket,
    `batch_size` at a time. Images that cannot be read now are left out of the dataset with a
    warning (UserError if no training image is left).
    """
    dataset.validate_for_latent_caching()
    if batch_size < 1:
        raise UserError(f"--vae_batch_size must be at least 1, got {batch_size}")
    counts, source = CacheCounts(), LatentSource()
    todo = []
    for job in _jobs_for(dataset.entries, strategy, to_disk, cache_dir):
        if to_disk and _is_reusable(job, strategy, skip_cache_check):
            source.add(_entry_ids(dataset, job), CachedLatents(path=job.path))
            counts.reused += 1
        else:
            todo.append(job)
    encoded = _encode_jobs(todo, strategy, vae, batch_size, device, dtype, to_disk)
    for job, cached in encoded:
        source.add(_entry_ids(dataset, job), cached)
    done = {id(job) for job, _ in encoded}
    failed = [job for job in todo if id(job) not in done]
    dataset.use_latent_source(source)
    counts.encoded = len(todo) - len(failed)
    counts.skipped = len(failed)
    if failed:
        dataset.drop_entries([entry for job in failed for entry in job.entries])
        logger.warning("left %d unreadable images out of the dataset", len(failed))
    logger.info("latents: %d images encoded, %d reused from cache files", counts.encoded, counts.reused)
    return counts


def _entry_ids(dataset: "TrainDataset", job: _CacheJob) -> list[str]:
    return [dataset.entry_id(entry) for entry in job.entries]


def _encode_jobs(jobs: list[_CacheJob], strategy, vae, batch_size: int, device, dtype,
                 to_disk: bool) -> list[tuple[_CacheJob, CachedLatents]]:
    """Encode and store the jobs' latents; jobs whose image could not be read are left out."""
    from tqdm import tqdm

    jobs = sorted(jobs, key=lambda job: (job.entry.bucket_wh, job.entry.image_path))
    done = []
    with tqdm(total=len(jobs), desc="caching latents", unit="img", disable=not jobs) as progress:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            for bucket_chunk in _split_by_bucket(chunk):
                done.extend(_encode_chunk(bucket_chunk, strategy, vae, device, dtype, to_disk))
            progress.update(len(chunk))
    return done


def _split_by_bucket(jobs: list[_CacheJob]) -> list[list[_CacheJob]]:
    groups: dict[tuple, list[_CacheJob]] = {}
    for job in jobs:
        groups.setdefault(job.entry.bucket_wh, []).append(job)
    return list(groups.values())


def _encode_chunk(jobs: list[_CacheJob], strategy, vae, device, dtype,
                  to_disk: bool) -> list[tuple[_CacheJob, CachedLatents]]:
    import random

    import torch

    readable, prepared = [], []
    for job in jobs:
        try:
            image = load_entry_image(job.entry)
        except ImageLoadError as e:
            logger.warning("skipping %s: %s", e.path, e.reason)
            continue
        entry = job.entry
        resized = entry.resized_wh if image.size == tuple(entry.image_size_wh) else None
        prepared.append(prepare_image(image, entry.bucket_wh, False, random.Random(0), flip=False, resized_wh=resized,
                                      interpolation=entry.subset.resize_interpolation))
        readable.append(job)
    if not readable:
        return []
    pixels = torch.stack([p.pixels for p in prepared]).to(device=device, dtype=dtype)
    flip_rows = [row for row, job in enumerate(readable) if job.need_flip]
    with torch.no_grad():
        latents = strategy.encode(vae, pixels).float().cpu()
        flipped = strategy.encode(vae, torch.flip(pixels[flip_rows], dims=[3])).float().cpu() if flip_rows else None
    done = []
    for row, (job, image) in enumerate(zip(readable, prepared)):
        tensors = {"latents": latents[row].clone()}
        if job.need_flip:
            tensors["latents_flipped"] = flipped[flip_rows.index(row)].clone()
        if job.need_alpha:
            alpha = image.alpha if image.alpha is not None else torch.ones(1, *pixels.shape[2:])
            tensors["alpha_mask"] = alpha
        done.append((job, _store(job, tensors, strategy, to_disk)))
    return done


def _store(job: _CacheJob, tensors: dict, strategy, to_disk: bool) -> CachedLatents:
    if not to_disk:
        return CachedLatents(latents=tensors["latents"], latents_flipped=tensors.get("latents_flipped"),
                             alpha_mask=tensors.get("alpha_mask"))
    metadata = expected_metadata(job.entry, strategy)
    metadata["flip"] = "1" if "latents_flipped" in tensors else "0"
    metadata["alpha_mask"] = "1" if "alpha_mask" in tensors else "0"
    save_safetensors_atomic(tensors, job.path, metadata)
    return CachedLatents(path=job.path)
