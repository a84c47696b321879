"""The four strategies of the SD3 / SD3.5 family, plus how its conditioning becomes the MMDiT's input.

As in sd-scripts (strategy_sd3.py) and diffusers' StableDiffusion3Pipeline: CLIP-L and CLIP-G read 77
tokens (CLIP-G pads with "!"), give their penultimate hidden states and their projected pooled outputs;
T5 reads `--t5xxl_max_token_length` tokens (default 256) and gives its last hidden state.
`--apply_lg_attn_mask` / `--apply_t5_attn_mask` pass the padding masks to the encoders (the MMDiT itself
takes no mask, as in sd-scripts). Each encoder's outputs are separate conditioning keys, so they are
cached separately: {"clip_l_hidden", "clip_l_pooled", "clip_g_hidden", "clip_g_pooled", "t5_hidden"}.
`mmdit_inputs` builds the denoiser's inputs: context = cat(CLIP-L, CLIP-G states) zero-padded to the T5
width, followed by the T5 states along the sequence; pooled = cat(L pooled, G pooled).
`drop_encoder_outputs` is sd-scripts' per-encoder dropout (`--clip_l_dropout_rate`, ...): a dropped
encoder's outputs become zeros. It runs on the conditioning at predict time, so it acts the same on
cached and freshly encoded outputs, drawing from Python's `random`, which the trainer reseeds for every
micro-batch (library/training/step_rng.py): a resumed run drops the same samples.
Latents: (posterior sample - 0.0609) * 1.5305 of the 16-channel VAE.
"""

from __future__ import annotations

import hashlib
import random

from library.families.flux_text import FluxLatentsCachingStrategy
from library.strategies import (
    Conditioning,
    TextEncoderOutputsCachingStrategy,
    TextEncodingStrategy,
    TokenizeStrategy,
    Tokens,
)

CLIP_MAX_LENGTH = 77
DEFAULT_T5_MAX_LENGTH = 256


class SD3TokenizeStrategy(TokenizeStrategy):
    """Captions -> one {"input_ids", "attention_mask"} per encoder (CLIP-L, CLIP-G: 77; T5: t5_max_length)."""

    def __init__(self, clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer, t5_max_length: int):
        self.tokenizers = (clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer)
        self.lengths = (CLIP_MAX_LENGTH, CLIP_MAX_LENGTH, t5_max_length)

    def tokenize(self, captions: list[str]) -> Tokens:
        tokens = []
        for tokenizer, length in zip(self.tokenizers, self.lengths):
            out = tokenizer(captions, max_length=length, padding="max_length", truncation=True, return_tensors="pt")
            tokens.append({"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]})
        return tokens


class SD3TextEncodingStrategy(TextEncodingStrategy):
    def __init__(self, apply_lg_attn_mask: bool = False, apply_t5_attn_mask: bool = False):
        self.apply_lg_attn_mask = apply_lg_attn_mask
        self.apply_t5_attn_mask = apply_t5_attn_mask

    def encode(self, text_encoders: list, tokens: Tokens) -> Conditioning:
        conditioning = {}
        for name, encoder, part in zip(("clip_l", "clip_g"), text_encoders[:2], tokens[:2]):
            mask = part["attention_mask"].to(encoder.device) if self.apply_lg_attn_mask else None
            out = encoder(part["input_ids"].to(encoder.device), attention_mask=mask, output_hidden_states=True)
            conditioning[f"{name}_hidden"] = out.hidden_states[-2]
            conditioning[f"{name}_pooled"] = out.text_embeds
        t5, part = text_encoders[2], tokens[2]
        mask = part["attention_mask"].to(t5.device) if self.apply_t5_attn_mask else None
        conditioning["t5_hidden"] = t5(part["input_ids"].to(t5.device), attention_mask=mask).last_hidden_state
        return conditioning


class SD3LatentsCachingStrategy(FluxLatentsCachingStrategy):
    """(posterior sample - shift_factor) * scaling_factor of the 16-channel SD3 VAE (1.5305, 0.0609)."""

    family = "sd3"


def drop_encoder_outputs(conditioning: Conditioning, rates: tuple[float, float, float]) -> Conditioning:
    """sd-scripts' per-encoder dropout on (cached or fresh) outputs: per sample, CLIP-L then CLIP-G, then
    T5 for every sample; a dropped encoder's hidden states (and pooled output) become zeros."""
    import torch

    l_rate, g_rate, t5_rate = rates
    if not any(rates):
        return conditioning
    batch = conditioning["t5_hidden"].shape[0]
    keep = {name: torch.ones(batch) for name in ("clip_l", "clip_g", "t5")}
    for i in range(batch):
        if l_rate > 0 and random.random() < l_rate:
            keep["clip_l"][i] = 0
        if g_rate > 0 and random.random() < g_rate:
            keep["clip_g"][i] = 0
    for i in range(batch):
        if t5_rate > 0 and random.random() < t5_rate:
            keep["t5"][i] = 0
    dropped = {}
    for key, tensor in conditioning.items():
        factor = keep[key.rsplit("_", 1)[0]].to(tensor.device, tensor.dtype)
        dropped[key] = tensor * factor.view(-1, *([1] * (tensor.dim() - 1)))
    return dropped


def mmdit_inputs(conditioning: Conditioning, device, dtype):
    """(encoder_hidden_states [B, 77 + L, T5 width], pooled_projections [B, L pooled + G pooled])."""
    import torch

    t5 = conditioning["t5_hidden"].to(device, dtype)
    clip = torch.cat([conditioning["clip_l_hidden"], conditioning["clip_g_hidden"]], dim=-1).to(device, dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    pooled = torch.cat([conditioning["clip_l_pooled"], conditioning["clip_g_pooled"]], dim=-1).to(device, dtype)
    return torch.cat([clip, t5], dim=-2), pooled


def text_encoders_fingerprint(encoders: list) -> str:
    """A short hash of the three encoders' configs and final norms, naming them in cache metadata."""
    digest = hashlib.sha256()
    for encoder in encoders:
        digest.update(repr(sorted(encoder.config.to_diff_dict().items())).encode("utf-8"))
        for name, tensor in encoder.state_dict().items():
            if name.endswith("final_layer_norm.weight"):
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class SD3TextEncoderOutputsCachingStrategy(TextEncoderOutputsCachingStrategy):
    """Cached SD3 conditioning is valid for the same encoders, T5 length and mask flags."""

    family = "sd3"

    def __init__(self, encoders_fingerprint: str, t5_max_length: int, apply_lg_attn_mask: bool,
                 apply_t5_attn_mask: bool):
        self.encoders_fingerprint = encoders_fingerprint
        self.t5_max_length = t5_max_length
        self.apply_lg_attn_mask = apply_lg_attn_mask
        self.apply_t5_attn_mask = apply_t5_attn_mask

    def cache_identity(self) -> dict[str, str]:
        return {
            "family": self.family, "text_encoders": f"clip-l+clip-g+t5xxl:{self.encoders_fingerprint}",
            "t5xxl_max_token_length": str(self.t5_max_length),
            "apply_lg_attn_mask": str(self.apply_lg_attn_mask).lower(),
            "apply_t5_attn_mask": str(self.apply_t5_attn_mask).lower(),
        }
