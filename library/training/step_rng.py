"""Randomness keyed by position in training, which is what makes resume exact.

Instead of carrying RNG state across steps, every micro-batch reseeds the global RNGs (LoRA dropout,
anything using torch's default generator) and gets its own noise generator from (seed, epoch, batch
index, process rank). A run resumed at batch k of epoch e therefore draws exactly what an
uninterrupted run draws there, with nothing to save but the position.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def batch_generator(seed: int, epoch: int, batch_index: int, rank: int, device) -> "torch.Generator":
    """Seeds the global RNGs for this micro-batch and returns the generator for its noise/timesteps."""
    import torch

    batch_seed = derive_seed(seed, epoch, batch_index, rank)
    seed_everything(derive_seed(batch_seed, "global"))
    generator = torch.Generator(device=device)
    generator.manual_seed(batch_seed)
    return generator
