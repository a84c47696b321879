"""The four strategies of the SD 1.x/2.x family: CLIP tokenization, text encoding, latents, TE cache identity.

Long captions follow sd-scripts' layout, so cached outputs and trained models behave alike:
`--max_token_length` 150/225 tokenizes to 152/227 ids (BOS, content, EOS, padding), then splits the
content into chunks of 75, each wrapped as [BOS] 75 ids [last id] -> input_ids [B, chunks, 77]. SD 2.x
(and SDXL) tokenizers pad with "!" rather than EOS, so a chunk whose content fills all 75 slots ends
with EOS and an empty chunk starts [BOS, EOS]. Encoding runs every chunk through CLIP and joins the
hidden states as the first chunk's BOS state, each chunk's 75 content states, and the last chunk's
final state: 77 / 152 / 227 positions. (sd-scripts has a further SD 2.x special case for empty
chunks that never triggers, because it compares token ids with a string; we match its real output.)
`--clip_skip N` takes hidden_states[-N] and applies the final layer norm. Weighted captions multiply
each content position's hidden state by its weight, nothing more: sd-scripts' training rule (its
strategy_sd encode_tokens_with_weights) and ours for SDXL. The mean restoration of sd-scripts'
inference helper (get_weighted_text_embeddings) is not applied, see docs/sd.md. `add_caption_arguments`
registers the two caption flags, --max_token_length and --weighted_captions, for SD and SDXL alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from library.prompt_weighting import tokenize_with_weights
from library.strategies import (
    Conditioning,
    LatentsCachingStrategy,
    TextEncoderOutputsCachingStrategy,
    TextEncodingStrategy,
    TokenizeStrategy,
    Tokens,
)

if TYPE_CHECKING:
    import torch

CHUNK_LENGTH = 77  # CLIP's context: BOS + 75 content tokens + EOS
CHUNK_CONTENT = CHUNK_LENGTH - 2
ALLOWED_MAX_TOKEN_LENGTHS = (75, 150, 225)


def add_caption_arguments(group) -> None:
    """--max_token_length and --weighted_captions: the CLIP caption flags SD and SDXL share."""
    group.add_argument("--max_token_length", type=int, default=None,
                       help="caption length in tokens: 75 (default), 150 or 225 (chunks of 75)")
    group.add_argument("--weighted_captions", action="store_true",
                       help="read (word:1.2), (word) and [word] in captions as attention weights")


def split_into_chunks(ids: "torch.Tensor", tokenizer) -> "torch.Tensor":
    """[max_length] ids of one caption -> [chunks, 77], each chunk wrapped as sd-scripts does."""
    import torch

    if ids.shape[0] == CHUNK_LENGTH:
        return ids.unsqueeze(0)
    pads_with_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    chunks = []
    for start in range(1, ids.shape[0] - 1, CHUNK_CONTENT):
        chunk = torch.cat([ids[:1], ids[start : start + CHUNK_CONTENT], ids[-1:]])
        if not pads_with_eos:
            if chunk[-2].item() not in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                chunk[-1] = tokenizer.eos_token_id  # content runs to the end: close it with EOS
            if chunk[1].item() == tokenizer.pad_token_id:
                chunk[1] = tokenizer.eos_token_id  # an empty chunk still holds an EOS
        chunks.append(chunk)
    return torch.stack(chunks)


def split_weights_into_chunks(weights: "torch.Tensor") -> "torch.Tensor":
    """[max_length] weights -> [chunks, 77] with 1.0 on each chunk's first and last position."""
    import torch

    n_chunks = (weights.shape[0] - 2) // CHUNK_CONTENT
    chunked = torch.ones(n_chunks, CHUNK_LENGTH, dtype=weights.dtype)
    for chunk in range(n_chunks):
        start = 1 + chunk * CHUNK_CONTENT
        chunked[chunk, 1:-1] = weights[start : start + CHUNK_CONTENT]
    return chunked


class SDTokenizeStrategy(TokenizeStrategy):
    """Captions -> [{"input_ids": [B, chunks, 77]}] (+ "weights" of the same shape when weighted)."""

    def __init__(self, tokenizer, max_token_length: int = 75, weighted: bool = False):
        if max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
            raise ValueError(f"max_token_length must be one of {ALLOWED_MAX_TOKEN_LENGTHS}")
        self.tokenizer = tokenizer
        self.max_length = max_token_length + 2
        self.weighted = weighted

    def _plain_ids(self, caption: str):
        return self.tokenizer(
            caption, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).input_ids[0]

    def tokenize(self, captions: list[str]) -> Tokens:
        import torch

        ids, weights = [], []
        for caption in captions:
            if self.weighted:
                caption_ids, caption_weights = tokenize_with_weights(self.tokenizer, caption, self.max_length)
                ids.append(split_into_chunks(torch.tensor(caption_ids), self.tokenizer))
                weights.append(split_weights_into_chunks(torch.tensor(caption_weights, dtype=torch.float32)))
            else:
                ids.append(split_into_chunks(self._plain_ids(caption), self.tokenizer))
        tokens = {"input_ids": torch.stack(ids)}
        if self.weighted:
            tokens["weights"] = torch.stack(weights)
        return [tokens]


def _final_layer_norm(text_encoder):
    inner = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 flattened CLIPTextModel
    return inner.final_layer_norm


def join_chunk_states(states: "torch.Tensor", n_chunks: int) -> "torch.Tensor":
    """[B*chunks, 77, D] -> [B, chunks*75 + 2, D]: first BOS, every chunk's content, last final state."""
    import torch

    batch = states.shape[0] // n_chunks
    states = states.reshape(batch, n_chunks * CHUNK_LENGTH, states.shape[-1])
    if n_chunks == 1:
        return states
    pieces = [states[:, :1]]
    for chunk in range(n_chunks):
        start = chunk * CHUNK_LENGTH + 1
        pieces.append(states[:, start : start + CHUNK_CONTENT])
    pieces.append(states[:, -1:])
    return torch.cat(pieces, dim=1)


def flat_weights(weights: "torch.Tensor") -> "torch.Tensor":
    """[B, chunks, 77] chunk weights -> [B, chunks*75 + 2] aligned with join_chunk_states."""
    import torch

    ones = torch.ones_like(weights[:, 0, :1])
    return torch.cat([ones, weights[:, :, 1:-1].reshape(weights.shape[0], -1), ones], dim=1)


def weight_content_positions(states: "torch.Tensor", chunk_weights: "torch.Tensor") -> "torch.Tensor":
    """Multiply each content position by its caption weight (BOS/EOS/padding weights are 1);
    chunk_weights is [B, chunks, 77] or [B, 77]."""
    chunks = chunk_weights.unsqueeze(1) if chunk_weights.dim() == 2 else chunk_weights
    weights = flat_weights(chunks).to(states.device, states.dtype)
    return states * weights.unsqueeze(-1)


class SDTextEncodingStrategy(TextEncodingStrategy):
    """Tokens -> {"encoder_hidden_states": [B, chunks*75 + 2 (77 for one chunk), D]}."""

    def __init__(self, clip_skip: Optional[int] = None):
        self.clip_skip = clip_skip

    def hidden_states(self, text_encoder, input_ids: "torch.Tensor") -> "torch.Tensor":
        """[N, 77] ids -> [N, 77, D], honouring clip_skip."""
        input_ids = input_ids.to(text_encoder.device)
        if self.clip_skip is None or self.clip_skip == 1:
            return text_encoder(input_ids).last_hidden_state
        output = text_encoder(input_ids, output_hidden_states=True)
        return _final_layer_norm(text_encoder)(output.hidden_states[-self.clip_skip])

    def encode(self, text_encoders: list, tokens: Tokens) -> Conditioning:
        text_encoder, token_dict = text_encoders[0], tokens[0]
        input_ids = token_dict["input_ids"]
        if input_ids.dim() == 2:  # one chunk without the chunk dimension
            input_ids = input_ids.unsqueeze(1)
        n_chunks = input_ids.shape[1]
        states = self.hidden_states(text_encoder, input_ids.reshape(-1, input_ids.shape[-1]))
        states = join_chunk_states(states, n_chunks)
        if "weights" in token_dict:
            states = weight_content_positions(states, token_dict["weights"])
        return {"encoder_hidden_states": states}


class SDLatentsCachingStrategy(LatentsCachingStrategy):
    """VAE latents scaled by vae.config.scaling_factor (0.18215 for SD), no shift.

    encode() samples from the VAE's posterior (`latent_dist.sample()`, as sd-scripts caches), with an
    optional torch.Generator for reproducible caches.
    """

    family = "sd"
    latent_channels = 4
    vae_scale_factor = 8

    def encode(self, vae, images, generator=None):
        posterior = vae.encode(images).latent_dist
        return posterior.sample(generator=generator) * vae.config.scaling_factor

    def decode(self, vae, latents):
        return vae.decode(latents / vae.config.scaling_factor).sample


class SDTextEncoderOutputsCachingStrategy(TextEncoderOutputsCachingStrategy):
    """What identifies cached SD text-encoder outputs: encoder, model source, length, clip skip, weighting."""

    family = "sd"

    def __init__(self, v2: bool, max_token_length: int, clip_skip: Optional[int], weighted: bool, source: str = ""):
        self.text_encoder_name = "openclip-h" if v2 else "clip-l"
        self.max_token_length = max_token_length
        self.clip_skip = clip_skip
        self.weighted = weighted
        self.source = source

    def cache_identity(self) -> dict[str, str]:
        return {
            "family": self.family, "text_encoder": self.text_encoder_name, "model": self.source,
            "max_token_length": str(self.max_token_length), "clip_skip": str(self.clip_skip or 1),
            # "multiply": outputs cached before the weighting rule changed (mean restored) do not match
            "weighted_captions": "multiply" if self.weighted else "false",
        }
