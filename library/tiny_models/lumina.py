"""A tiny Lumina Image 2.0 with the real module layout, for tests and benchmarks (nothing downloaded).

Sizes: transformer width 64 (4 heads of 16, 2 key/value heads, rotary axes (4, 6, 6)),
2 layers and 1 refiner layer each, Gemma-2 width 32 = cap_feat_dim, the 16-channel FLUX AE. The Gemma
tokenizer is a small sentencepiece model trained on the fly (library/models/gemma_tokenizer.py).
`save_tiny_lumina_pipeline(folder)` writes a diffusers Lumina2Pipeline folder; `save_tiny_lumina_single_files`
writes what users download (original transformer, gemma_2_2b, ae) plus a tokenizer folder.
"""

from __future__ import annotations

import os

TINY_GEMMA_VOCAB = 512


def tiny_lumina_transformer(seed: int = 0):
    import torch
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    model = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, hidden_size=64, num_layers=2, num_refiner_layers=1,
        num_attention_heads=4, num_kv_heads=2, multiple_of=16, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=(4, 6, 6), axes_lens=(300, 512, 512), cap_feat_dim=32,
    )
    with torch.no_grad():  # diffusers zero-initialises the modulations and output: make every path matter
        for name, param in model.named_parameters():
            if param.abs().sum() == 0:
                param.normal_(0, 0.02)
    return model


def tiny_gemma2(seed: int = 0):
    import torch
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    return Gemma2Model(Gemma2Config(
        vocab_size=TINY_GEMMA_VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, sliding_window=64, query_pre_attn_scalar=8,
    ))


def tiny_gemma_tokenizer(folder: str):
    from library.models.gemma_tokenizer import load_gemma_tokenizer, train_sentencepiece_gemma_tokenizer

    train_sentencepiece_gemma_tokenizer(folder)
    return load_gemma_tokenizer(folder)


def tiny_lumina_pipeline(tokenizer_folder: str, seed: int = 0):
    from diffusers import Lumina2Pipeline

    from library.models.lumina_checkpoint import lumina_sampling_scheduler
    from library.tiny_models.flux import tiny_flux_ae

    return Lumina2Pipeline(
        transformer=tiny_lumina_transformer(seed), scheduler=lumina_sampling_scheduler(), vae=tiny_flux_ae(seed),
        text_encoder=tiny_gemma2(seed), tokenizer=tiny_gemma_tokenizer(tokenizer_folder),
    )


def save_tiny_lumina_pipeline(folder: str, seed: int = 0) -> str:
    import tempfile

    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        tiny_lumina_pipeline(tokenizer_folder, seed).save_pretrained(folder)
    return folder


def save_tiny_lumina_single_files(folder: str, seed: int = 0, with_prefix: bool = False) -> dict[str, str]:
    """{"transformer", "gemma2", "ae", "gemma2_tokenizer"} -> path of files laid out as users download them."""
    from library.models import flux_checkpoint
    from library.models import lumina_checkpoint as ckpt
    from library.models.gemma_tokenizer import train_sentencepiece_gemma_tokenizer
    from library.tiny_models.flux import tiny_flux_ae

    os.makedirs(folder, exist_ok=True)
    paths = {"gemma2_tokenizer": os.path.join(folder, "gemma2_tokenizer")}
    train_sentencepiece_gemma_tokenizer(paths["gemma2_tokenizer"])
    paths["transformer"] = ckpt.save_lumina_transformer_original(
        tiny_lumina_transformer(seed), os.path.join(folder, "lumina_2.safetensors"), with_prefix=with_prefix)
    paths["gemma2"] = ckpt.save_gemma2(tiny_gemma2(seed), os.path.join(folder, "gemma_2_2b.safetensors"))
    paths["ae"] = flux_checkpoint.save_flux_ae(tiny_flux_ae(seed), os.path.join(folder, "ae.safetensors"))
    return paths
