"""The four strategies of the SDXL family: two CLIP tokenizers and encoders, latents, TE cache identity.

SDXL conditions its UNet on two text encoders, as sd-scripts' strategy_sdxl does:
- CLIP-L: hidden_states[11] of its 12 layers (the penultimate layer's output, no final layer norm);
  we take hidden_states[-2], the same layer for the real model and the penultimate one for tiny models.
- OpenCLIP bigG: hidden_states[-2] (penultimate, no final layer norm), and the pooled output: the
  final (layer-normed) state at the first EOS token, through `text_projection`. The EOS position is
  found from the token ids, not from CLIP's argmax-of-ids pooling.
Both tokenizers use SD's layout for --max_token_length 150/225 (chunks of 75 wrapped in BOS/EOS,
library/families/sd_text.py); the second pads with "!" (id 0). Chunk states are joined like SD's,
and the pooled output comes from the first chunk. The conditioning is
{"encoder_hidden_states": [B, L, 768 + 1280], "text_embeds": [B, 1280]} (widths of the real model).
Weighted captions multiply each content position of both hidden states by its weight (sd-scripts'
rule, the same as SD 1.x here: no mean restoration, the pooled output unweighted).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from library.families.sd_text import (
    SDLatentsCachingStrategy,
    SDTokenizeStrategy,
    join_chunk_states,
    weight_content_positions,
)
from library.strategies import (
    Conditioning,
    TextEncoderOutputsCachingStrategy,
    TextEncodingStrategy,
    TokenizeStrategy,
    Tokens,
)

if TYPE_CHECKING:
    import torch

CLIP_EOS_TOKEN_ID = 49407  # <|endoftext|> in the CLIP BPE vocabulary both SDXL tokenizers share
HIDDEN_LAYER = -2  # CLIP-L's hidden_states[11] of 12 layers; bigG's penultimate layer


class SDXLTokenizeStrategy(TokenizeStrategy):
    """Captions -> [CLIP-L tokens, bigG tokens], each {"input_ids": [B, chunks, 77]} (+ "weights")."""

    def __init__(self, tokenizer_1, tokenizer_2, max_token_length: int = 75, weighted: bool = False):
        self.per_encoder = [SDTokenizeStrategy(tokenizer_1, max_token_length, weighted),
                            SDTokenizeStrategy(tokenizer_2, max_token_length, weighted)]

    def tokenize(self, captions: list[str]) -> Tokens:
        return [strategy.tokenize(captions)[0] for strategy in self.per_encoder]


def _as_chunks(tensor: "torch.Tensor") -> "torch.Tensor":
    return tensor.unsqueeze(1) if tensor.dim() == 2 else tensor  # [B, 77] -> [B, 1, 77]


def pooled_at_first_eos(text_encoder_2, last_hidden_state, input_ids) -> "torch.Tensor":
    """bigG's pooled text embedding: the final state at each row's first EOS, projected."""
    import torch

    eos_index = (input_ids == CLIP_EOS_TOKEN_ID).int().argmax(dim=1).to(last_hidden_state.device)
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    pooled = last_hidden_state[rows, eos_index]
    projection = text_encoder_2.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden_state.dtype)


class SDXLTextEncodingStrategy(TextEncodingStrategy):
    """[CLIP-L tokens, bigG tokens] -> {"encoder_hidden_states": [B, L, D1 + D2], "text_embeds": [B, P]}."""

    def encode(self, text_encoders: list, tokens: Tokens) -> Conditioning:
        import torch

        text_encoder_1, text_encoder_2 = text_encoders
        ids_1, ids_2 = _as_chunks(tokens[0]["input_ids"]), _as_chunks(tokens[1]["input_ids"])
        n_chunks = ids_1.shape[1]
        flat_1 = ids_1.reshape(-1, ids_1.shape[-1]).to(text_encoder_1.device)
        flat_2 = ids_2.reshape(-1, ids_2.shape[-1]).to(text_encoder_2.device)
        states_1 = text_encoder_1(flat_1, output_hidden_states=True).hidden_states[HIDDEN_LAYER]
        output_2 = text_encoder_2(flat_2, output_hidden_states=True)
        states_2 = output_2.hidden_states[HIDDEN_LAYER]
        pooled = pooled_at_first_eos(text_encoder_2, output_2.last_hidden_state, flat_2)[::n_chunks]
        states_1 = join_chunk_states(states_1, n_chunks)
        states_2 = join_chunk_states(states_2, n_chunks)
        if "weights" in tokens[0]:
            states_1 = weight_content_positions(states_1, tokens[0]["weights"])
            states_2 = weight_content_positions(states_2, tokens[1]["weights"])
        hidden = torch.cat([states_1, states_2.to(states_1.dtype)], dim=-1)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}


class SDXLLatentsCachingStrategy(SDLatentsCachingStrategy):
    """SD's latents (posterior sample x vae.config.scaling_factor, 0.13025 for SDXL's VAE), cached apart."""

    family = "sdxl"


def text_encoders_fingerprint(text_encoder_1, text_encoder_2) -> str:
    """A short hash of both encoders' sizes and a few of their weights, naming them in cache metadata."""
    digest = hashlib.sha256()
    for encoder in (text_encoder_1, text_encoder_2):
        config = encoder.config
        sizes = (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size)
        digest.update(repr(sizes).encode("utf-8"))
        state = encoder.state_dict()
        for name in sorted(state):
            if name.endswith(("final_layer_norm.weight", "final_layer_norm.bias", "text_projection.weight",
                              "layers.0.self_attn.q_proj.bias")):
                digest.update(state[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class SDXLTextEncoderOutputsCachingStrategy(TextEncoderOutputsCachingStrategy):
    """What identifies cached SDXL conditioning: both encoders, token length, caption weighting."""

    family = "sdxl"

    def __init__(self, encoders_fingerprint: str, max_token_length: int, weighted: bool):
        self.encoders_fingerprint = encoders_fingerprint
        self.max_token_length = max_token_length
        self.weighted = weighted

    def cache_identity(self) -> dict[str, str]:
        return {
            "family": self.family, "text_encoders": f"clip-l+openclip-bigg:{self.encoders_fingerprint}",
            "hidden_layers": "clip-l[-2],bigg[-2]+pooled", "max_token_length": str(self.max_token_length),
            "weighted_captions": str(self.weighted).lower(),
        }
