"""Encode a dataset's captions with the text encoders once and write the cache files training reuses.

    python tools/cache_text_encoder_outputs.py --family sd --pretrained_model_name_or_path model.safetensors \
        --dataset_config ds.toml [--text_encoder_cache_variants 8] [--text_encoder_cache_dir DIR]
    accelerate launch tools/cache_text_encoder_outputs.py ...      (each process caches every N-th image)

Same model, dataset and text-encoder flags as the training scripts; a training run with
`--cache_text_encoder_outputs_to_disk` and the same flags then reuses every file. Files that are
still valid (same encoders, flags and caption texts) are skipped.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.tools_common import run_tool  # noqa: E402

logger = logging.getLogger("cache_text_encoder_outputs")


def cache_text_encoder_outputs(argv: list[str]):
    """Parse the flags, cache this process's share of the captions; returns the TextCacheCounts."""
    from library.data.text_encoder_cache import add_text_encoder_cache_arguments, cache_dataset_text_encoder_outputs
    from library.families import get_family
    from library.tools_common import (
        DatasetShard, build_model_data_parser, choose_family_name, load_dataset, parse_tool_args, shard_entries,
    )

    family = get_family(choose_family_name(argv))
    parser = build_model_data_parser(family, f"Cache text-encoder outputs of a {family.display_name} dataset.")
    add_text_encoder_cache_arguments(parser)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                        help="text-encoder dtype while encoding (use the training run's value)")
    family, args = parse_tool_args(family, parser, argv)
    args.cache_text_encoder_outputs_to_disk = True  # writing the files is what this tool is for

    from accelerate import PartialState

    from library.devices import move_module, torch_dtype

    state = PartialState()
    dataset = load_dataset(args)
    shard = DatasetShard(dataset, shard_entries(dataset.entries, state.process_index, state.num_processes))
    components = family.load(args)
    components.vae = None  # not needed here; lets it be freed
    for encoder in components.text_encoders:
        encoder.requires_grad_(False)
        move_module(encoder, state.device, torch_dtype(args.mixed_precision))
    logger.info("process %d/%d caches %d of %d images", state.process_index + 1, state.num_processes,
                len(shard.entries), len(dataset.entries))
    counts = cache_dataset_text_encoder_outputs(shard, family, args, components, state.device)
    state.wait_for_everyone()
    return counts


if __name__ == "__main__":
    run_tool(cache_text_encoder_outputs)
