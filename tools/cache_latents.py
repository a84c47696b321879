"""Encode a dataset's images with the VAE once and write the latent cache files training reuses.

    python tools/cache_latents.py --family sd --pretrained_model_name_or_path model.safetensors \
        --dataset_config ds.toml [--vae_batch_size 4] [--latents_cache_dir DIR]
    accelerate launch tools/cache_latents.py ...      (each process caches every N-th image)

Same model, dataset and caching flags as the training scripts; only the VAE is loaded. Files that
are still valid are skipped; the training run then finds every latent cached
(`--cache_latents_to_disk`) and never encodes an image.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.tools_common import run_tool  # noqa: E402

logger = logging.getLogger("cache_latents")


def cache_latents(argv: list[str]):
    """Parse the flags, cache this process's share of the images; returns the CacheCounts."""
    from library.families import get_family
    from library.tools_common import (
        DatasetShard, build_model_data_parser, choose_family_name, load_dataset, parse_tool_args, shard_entries,
    )

    family = get_family(choose_family_name(argv))
    parser = build_model_data_parser(family, f"Cache VAE latents of a {family.display_name} dataset.",
                                     model_optional=True)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                        help="VAE dtype while encoding (--no_half_vae keeps float32)")
    family, args = parse_tool_args(family, parser, argv)

    import torch
    from accelerate import PartialState

    from library.data.latent_cache import cache_dataset_latents
    from library.devices import move_module, torch_dtype

    state = PartialState()
    dataset = load_dataset(args)
    shard = DatasetShard(dataset, shard_entries(dataset.entries, state.process_index, state.num_processes))
    dtype = torch.float32 if getattr(args, "no_half_vae", False) else torch_dtype(args.mixed_precision)
    vae = family.load_vae(args)
    vae.requires_grad_(False)
    move_module(vae, state.device, dtype)
    vae.eval()
    logger.info("process %d/%d caches %d of %d images", state.process_index + 1, state.num_processes,
                len(shard.entries), len(dataset.entries))
    counts = cache_dataset_latents(
        shard, family.latents_caching_strategy(args), vae, to_disk=True, batch_size=args.vae_batch_size,
        device=state.device, dtype=dtype, skip_cache_check=args.skip_cache_check, cache_dir=args.latents_cache_dir,
    )
    if shard.dropped:
        logger.warning("%d unreadable images were not cached", len(shard.dropped))
    state.wait_for_everyone()
    return counts


if __name__ == "__main__":
    run_tool(cache_latents)
