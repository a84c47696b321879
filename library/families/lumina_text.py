"""The four strategies of the Lumina Image 2.0 family: Gemma-2 tokenization with Lumina's system prompt,
the penultimate Gemma-2 hidden state, 16-channel FLUX-AE latents, and what identifies cached outputs.

As Lumina2Pipeline and sd-scripts (strategy_lumina.py) do: each caption becomes
`<system prompt> <Prompt Start> <caption>` (the caption alone when --system_prompt is empty), tokenized
with a BOS to `--gemma2_max_token_length` tokens (default 256), right-padded; the conditioning is
Gemma-2's second-to-last hidden state with the attention mask:
{"gemma2_hidden_states": [B, L, 2304], "gemma2_attention_mask": [B, L]} (widths of the real model).
Latents: (AE sample - 0.1159) * 0.3611, as FLUX.
"""

from __future__ import annotations

from library.families.flux_text import FluxLatentsCachingStrategy
from library.strategies import Conditioning, TextEncoderOutputsCachingStrategy, TextEncodingStrategy, TokenizeStrategy, Tokens

# diffusers' Lumina2Pipeline.system_prompt (the one Lumina-Image-2.0 was trained with)
DEFAULT_SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of "
                         "image-text alignment based on textual prompts or user prompts.")
PROMPT_SEPARATOR = " <Prompt Start> "
DEFAULT_MAX_TOKEN_LENGTH = 256


def with_system_prompt(caption: str, system_prompt: str) -> str:
    return f"{system_prompt}{PROMPT_SEPARATOR}{caption}" if system_prompt else caption


class LuminaTokenizeStrategy(TokenizeStrategy):
    """Captions -> [{"input_ids": [B, L], "attention_mask": [B, L]}]."""

    def __init__(self, tokenizer, max_length: int = DEFAULT_MAX_TOKEN_LENGTH, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.tokenizer, self.max_length, self.system_prompt = tokenizer, max_length, system_prompt

    def tokenize(self, captions: list[str]) -> Tokens:
        texts = [with_system_prompt(caption, self.system_prompt) for caption in captions]
        tokens = self.tokenizer(texts, max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt")
        return [{"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}]


class LuminaTextEncodingStrategy(TextEncodingStrategy):
    def encode(self, text_encoders: list, tokens: Tokens) -> Conditioning:
        (gemma,) = text_encoders
        device = next(gemma.parameters()).device
        ids, mask = tokens[0]["input_ids"].to(device), tokens[0]["attention_mask"].to(device)
        hidden = gemma(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"gemma2_hidden_states": hidden, "gemma2_attention_mask": mask}


class LuminaLatentsCachingStrategy(FluxLatentsCachingStrategy):
    family = "lumina"


def gemma2_fingerprint(gemma) -> str:
    """A short hash of the encoder's config and final norm, naming it in cache metadata."""
    import hashlib

    digest = hashlib.sha256(repr(sorted(gemma.config.to_diff_dict().items())).encode("utf-8"))
    digest.update(gemma.norm.weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class LuminaTextEncoderOutputsCachingStrategy(TextEncoderOutputsCachingStrategy):
    """Cached Lumina conditioning is valid for the same Gemma-2, token length and system prompt."""

    family = "lumina"

    def __init__(self, encoder_fingerprint: str, max_length: int, system_prompt: str):
        self.encoder_fingerprint, self.max_length, self.system_prompt = encoder_fingerprint, max_length, system_prompt

    def cache_identity(self) -> dict[str, str]:
        return {"family": self.family, "text_encoders": f"gemma2:{self.encoder_fingerprint}",
                "gemma2_max_token_length": str(self.max_length), "system_prompt": self.system_prompt}
