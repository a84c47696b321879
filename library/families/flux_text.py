"""The four strategies of the FLUX.1 family: CLIP-L + T5-XXL tokenization and encoding, 16-channel latents,
and what identifies cached text-encoder outputs.

As in sd-scripts (strategy_flux.py): CLIP-L reads 77 tokens and gives its pooled output (the final
state at the first EOS); T5 reads `--t5xxl_max_token_length` tokens (512 dev / 256 schnell) padded with
<pad>, and its attention mask is applied inside T5 only with `--apply_t5_attn_mask` (the same flag
also masks the padding in the transformer's joint attention, see FluxFamily.predict). Conditioning:
{"pooled": [B, 768], "t5_hidden_states": [B, L, 4096], "t5_attention_mask": [B, L]} (widths of the
real model). Latents are the AE posterior sample, shifted and scaled: (z - 0.1159) * 0.3611.
"""

from __future__ import annotations

import hashlib

from library.strategies import (
    Conditioning,
    LatentsCachingStrategy,
    TextEncoderOutputsCachingStrategy,
    TextEncodingStrategy,
    TokenizeStrategy,
    Tokens,
)

CLIP_MAX_LENGTH = 77


class FluxTokenizeStrategy(TokenizeStrategy):
    """Captions -> [{"input_ids": [B, 77]}, {"input_ids": [B, L], "attention_mask": [B, L]}]."""

    def __init__(self, clip_tokenizer, t5_tokenizer, t5_max_length: int):
        self.clip_tokenizer, self.t5_tokenizer, self.t5_max_length = clip_tokenizer, t5_tokenizer, t5_max_length

    def tokenize(self, captions: list[str]) -> Tokens:
        clip = self.clip_tokenizer(captions, max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True,
                                   return_tensors="pt")
        t5 = self.t5_tokenizer(captions, max_length=self.t5_max_length, padding="max_length", truncation=True,
                               return_tensors="pt")
        return [{"input_ids": clip["input_ids"]},
                {"input_ids": t5["input_ids"], "attention_mask": t5["attention_mask"]}]


class FluxTextEncodingStrategy(TextEncodingStrategy):
    def __init__(self, apply_t5_attn_mask: bool = False):
        self.apply_t5_attn_mask = apply_t5_attn_mask

    def encode(self, text_encoders: list, tokens: Tokens) -> Conditioning:
        clip, t5 = text_encoders
        clip_ids = tokens[0]["input_ids"].to(clip.device)
        pooled = clip(clip_ids).pooler_output
        t5_ids, mask = tokens[1]["input_ids"].to(t5.device), tokens[1]["attention_mask"].to(t5.device)
        hidden = t5(t5_ids, attention_mask=mask if self.apply_t5_attn_mask else None).last_hidden_state
        return {"pooled": pooled, "t5_hidden_states": hidden, "t5_attention_mask": mask}


class FluxLatentsCachingStrategy(LatentsCachingStrategy):
    """(posterior sample - shift_factor) * scaling_factor of the 16-channel AE; 8 pixels per latent cell."""

    family = "flux"
    latent_channels = 16
    vae_scale_factor = 8

    def encode(self, vae, images, generator=None):
        sample = vae.encode(images).latent_dist.sample(generator=generator)
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

    def decode(self, vae, latents):
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample


def text_encoders_fingerprint(clip, t5) -> str:
    """A short hash of both encoders' sizes and final norms, naming them in cache metadata."""
    digest = hashlib.sha256()
    for encoder, norm in ((clip, "final_layer_norm.weight"), (t5, "encoder.final_layer_norm.weight")):
        digest.update(repr(sorted(encoder.config.to_diff_dict().items())).encode("utf-8"))
        for name, tensor in encoder.state_dict().items():
            if name.endswith(norm):
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class FluxTextEncoderOutputsCachingStrategy(TextEncoderOutputsCachingStrategy):
    """Cached FLUX conditioning is valid for the same encoders, T5 length and mask flag."""

    family = "flux"

    def __init__(self, encoders_fingerprint: str, t5_max_length: int, apply_t5_attn_mask: bool):
        self.encoders_fingerprint = encoders_fingerprint
        self.t5_max_length = t5_max_length
        self.apply_t5_attn_mask = apply_t5_attn_mask

    def cache_identity(self) -> dict[str, str]:
        return {
            "family": self.family, "text_encoders": f"clip-l+t5xxl:{self.encoders_fingerprint}",
            "t5xxl_max_token_length": str(self.t5_max_length),
            "apply_t5_attn_mask": str(self.apply_t5_attn_mask).lower(),
        }
