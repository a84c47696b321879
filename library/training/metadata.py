"""Training metadata written into saved files: sd-scripts' `ss_*` keys and the SAI model spec.

A1111/Forge and ComfyUI show these fields (resolution, base model, tags, dim/alpha), so we fill
them like sd-scripts does; every value is a string because safetensors metadata is str -> str.
"""

from __future__ import annotations

import json
import os
import time
import uuid


def _text(value) -> str:
    return "None" if value is None else str(value)


def _subset_name(entry) -> str:
    folder = entry.subset.image_dir or entry.subset.metadata_file or ""
    return os.path.basename(os.path.normpath(folder))


def dataset_dirs_summary(entries) -> dict:
    """sd-scripts' ss_dataset_dirs: {folder name: {"n_repeats": r, "img_count": n}}."""
    summary: dict[str, dict[str, int]] = {}
    for entry in entries:
        item = summary.setdefault(_subset_name(entry), {"n_repeats": entry.subset.num_repeats, "img_count": 0})
        item["img_count"] += 1
    return summary


def tag_frequency(entries) -> dict:
    """sd-scripts' ss_tag_frequency: {folder name: {tag: count}} over the raw captions."""
    frequency: dict[str, dict[str, int]] = {}
    for entry in entries:
        tags = frequency.setdefault(_subset_name(entry), {})
        separator = entry.subset.captions.caption_separator or ","
        for tag in (t.strip() for t in entry.caption.split(separator)):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    return frequency


def training_metadata(args, family, components, dataset, optimizer_description: str, *, num_batches_per_epoch: int, num_epochs: int,
                      max_train_steps: int, seed: int, started_at: float) -> dict[str, str]:
    """The fixed part of the metadata, computed once when training starts."""
    resolution = dataset.datasets[0].resolution
    num_reg = sum(1 for entry in dataset.entries if entry.is_reg)
    metadata = {
        "ss_session_id": str(uuid.uuid4().int % 2**31),
        "ss_training_started_at": str(started_at),
        "ss_output_name": args.output_name,
        "ss_learning_rate": _text(args.learning_rate),
        "ss_text_encoder_lr": _text(getattr(args, "text_encoder_lr", getattr(args, "learning_rate_te", None))),
        "ss_unet_lr": _text(getattr(args, "unet_lr", None)),
        "ss_num_train_images": str(len(dataset.entries) - num_reg),
        "ss_num_reg_images": str(num_reg),
        "ss_num_batches_per_epoch": str(num_batches_per_epoch),
        "ss_num_epochs": str(num_epochs),
        "ss_gradient_checkpointing": str(args.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_max_train_steps": str(max_train_steps),
        "ss_lr_warmup_steps": _text(args.lr_warmup_steps),
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_optimizer": optimizer_description,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": str(args.full_fp16),
        "ss_full_bf16": str(args.full_bf16),
        "ss_seed": str(seed),
        "ss_noise_offset": _text(args.noise_offset),
        "ss_min_snr_gamma": _text(args.min_snr_gamma),
        "ss_prior_loss_weight": str(args.prior_loss_weight),
        "ss_sd_model_name": os.path.basename(str(args.pretrained_model_name_or_path)),
        "ss_base_model_version": family.base_model_version,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_tag_frequency": json.dumps(tag_frequency(dataset.entries)),
        "ss_dataset_dirs": json.dumps(dataset_dirs_summary(dataset.entries)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": args.output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
    }
    for name in family.metadata_flags:
        metadata[f"ss_{name}"] = _text(getattr(args, name))
    metadata.update(family.objective_metadata(components))
    return metadata


def save_time_metadata(base: dict[str, str], *, step: int, epoch: int, architecture: str) -> dict[str, str]:
    """Per-save additions: where training was when this file was written."""
    return {**base, "ss_steps": str(step), "ss_epoch": str(epoch),
            "ss_training_finished_at": str(time.time()), "modelspec.architecture": architecture}
