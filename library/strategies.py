"""The four strategies every model family composes, as abstract interfaces.

1. TokenizeStrategy: caption text -> token ids (+ masks, + per-token weights) per text encoder.
2. TextEncodingStrategy: token ids -> the conditioning dict the denoiser consumes.
3. LatentsCachingStrategy: images -> VAE latents, and where/how those latents are cached.
4. TextEncoderOutputsCachingStrategy: the same for text-encoder outputs.

Families (library/families/) subclass these; the trainer and the tools only talk to these methods.
Strategies are plain objects passed explicitly: there is no global registry.

Shapes and conventions shared by all families:
- `Tokens`: one dict per text encoder, tensors batched on dim 0, e.g. {"input_ids": [B, L]};
  a strategy that chunks long captions returns [B, chunks, 77] and handles that in encode().
  Optional keys: "attention_mask", "weights" (weighted captions, same shape as input_ids).
- `Conditioning`: a flat dict of tensors batched on dim 0 (e.g. {"encoder_hidden_states": [B,L,D]}),
  so it can be cached per sample in a safetensors file and collated by stacking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

Tokens = list  # list[dict[str, torch.Tensor]], one entry per text encoder
Conditioning = dict  # dict[str, torch.Tensor], batched on dim 0


class TokenizeStrategy(ABC):
    @abstractmethod
    def tokenize(self, captions: list[str]) -> Tokens:
        """Tokenize a batch of final captions (after the dataset's caption pipeline)."""


class TextEncodingStrategy(ABC):
    @abstractmethod
    def encode(self, text_encoders: list, tokens: Tokens) -> Conditioning:
        """Run the text encoders (already on the right device) and return the conditioning."""


class LatentsCachingStrategy(ABC):
    """Encodes images to the latents the denoiser trains on and names their cache files.

    `family` and `latent_channels` go into cache-file metadata, so a cache written for another
    family or VAE is detected as stale and rebuilt.
    """

    family: str
    latent_channels: int
    vae_scale_factor: int = 8  # pixels per latent cell
    vae_identity: str = ""  # which VAE weights: set by the family from its flags (see weights_identity)

    @abstractmethod
    def encode(self, vae: Any, images: "torch.Tensor",
               generator: Optional["torch.Generator"] = None) -> "torch.Tensor":
        """images [B,3,H,W] in [-1,1] on the VAE's device/dtype -> scaled (and shifted) latents, sampled
        from the VAE's posterior with `generator` (None: torch's global random state)."""

    @abstractmethod
    def decode(self, vae: Any, latents: "torch.Tensor") -> "torch.Tensor":
        """Inverse of encode, for sampling and checks: latents -> images in [-1,1]."""

    def cache_identity(self) -> dict[str, str]:
        """Metadata that must match for a cached latent to be reused (another VAE = stale cache)."""
        return {"family": self.family, "latent_channels": str(self.latent_channels), "vae": self.vae_identity}


def weights_identity(source: str | None) -> str:
    """Names a weights source without loading it: file name, size and modification time of the
    file (for a folder, of every weights file in it), or the hub id as given."""
    import os

    if not source:
        return ""
    if os.path.isfile(source):
        files = [source]
    elif os.path.isdir(source):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(source) for name in names
                       if name.endswith((".safetensors", ".bin", ".ckpt", ".pt")))
    else:
        return source
    parts = []
    for path in files:
        stat = os.stat(path)
        parts.append(f"{os.path.relpath(path, source) if path != source else os.path.basename(path)}:"
                     f"{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)


class TextEncoderOutputsCachingStrategy(ABC):
    """Which conditioning tensors can be cached, and what identifies a valid cache entry."""

    family: str

    @abstractmethod
    def cache_identity(self) -> dict[str, str]:
        """Metadata that must match for a cached conditioning to be reused (encoders, lengths, flags)."""
