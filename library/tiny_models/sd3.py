"""A tiny SD3 / SD3.5 with the real module layout, for tests and benchmarks (nothing downloaded).

Sizes: MMDiT inner width 32 (2 heads of 16), 16 latent channels, CLIP-L width 32
and CLIP-G width 48 (different, so a swapped pair fails), pooled = 32 + 48 = 80, T5 width 96 = the
joint attention width (>= 32 + 48, the CLIP states are zero-padded to it). `dual_attention=True` gives
the SD3.5-medium layout (attn2 in block 0, RMS qk-norm). `save_tiny_sd3_pipeline` writes a diffusers
StableDiffusion3Pipeline folder; `save_tiny_sd3_single_file` writes an SAI single file (MMDiT, VAE and,
optionally, the three text encoders) plus clip_l/clip_g/t5xxl files and a T5 tokenizer folder.
"""

from __future__ import annotations

import os

CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 32, 48, 96


def tiny_sd3_transformer(dual_attention: bool = False, seed: int = 0):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual_attention else {}
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=32, pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        out_channels=16, pos_embed_max_size=32, **extra,
    )


def tiny_sd3_vae(seed: int = 0):
    from library.models.sd3_checkpoint import SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR
    from library.tiny_models.sd import tiny_vae

    return tiny_vae(latent_channels=16, layers_per_block=2, seed=seed, scaling_factor=SD3_VAE_SCALING_FACTOR,
                    shift_factor=SD3_VAE_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3_clip(width: int, big_g: bool, seed: int = 0):
    """CLIPTextModelWithProjection: CLIP-L (quick_gelu, pads with EOS) or CLIP-G (gelu, pads with "!")."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed + (1 if big_g else 0))
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu" if big_g else "quick_gelu", projection_dim=width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if big_g else 49407,
    ))


def tiny_sd3_t5(seed: int = 0):
    import torch
    from transformers import T5Config, T5EncoderModel

    from library.tiny_models.flux import TINY_T5_VOCAB

    torch.manual_seed(seed + 2)
    return T5EncoderModel(T5Config(
        vocab_size=TINY_T5_VOCAB, d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
        use_cache=False,
    ))


def tiny_sd3_pipeline(tokenizer_folder: str, dual_attention: bool = False, seed: int = 0):
    from diffusers import StableDiffusion3Pipeline

    from library.models.clip_tokenizer import build_clip_tokenizer
    from library.models.sd3_checkpoint import sd3_sampling_scheduler
    from library.tiny_models.flux import tiny_t5_tokenizer

    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(dual_attention, seed), scheduler=sd3_sampling_scheduler(),
        vae=tiny_sd3_vae(seed), text_encoder=tiny_sd3_clip(CLIP_L_WIDTH, False, seed),
        tokenizer=build_clip_tokenizer(), text_encoder_2=tiny_sd3_clip(CLIP_G_WIDTH, True, seed),
        tokenizer_2=build_clip_tokenizer(pad_token="!"), text_encoder_3=tiny_sd3_t5(seed),
        tokenizer_3=tiny_t5_tokenizer(tokenizer_folder),
    )


def save_tiny_sd3_pipeline(folder: str, dual_attention: bool = False, seed: int = 0) -> str:
    import tempfile

    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        tiny_sd3_pipeline(tokenizer_folder, dual_attention, seed).save_pretrained(folder)
    return folder


def save_tiny_sd3_single_file(folder: str, dual_attention: bool = False, with_text_encoders: bool = True,
                              seed: int = 0) -> dict[str, str]:
    """sd3 single file (+ separate clip_l/clip_g/t5xxl files and a T5 tokenizer folder); returns
    {"checkpoint", "clip_l", "clip_g", "t5xxl", "t5_tokenizer"} -> path."""
    from library.models import sd3_checkpoint as ckpt
    from library.models.t5_tokenizer import train_sentencepiece_t5_tokenizer
    from library.tiny_models.flux import TINY_T5_VOCAB

    os.makedirs(folder, exist_ok=True)
    paths = {"t5_tokenizer": os.path.join(folder, "t5_tokenizer")}
    train_sentencepiece_t5_tokenizer(paths["t5_tokenizer"], vocab_size=TINY_T5_VOCAB)
    encoders = [tiny_sd3_clip(CLIP_L_WIDTH, False, seed), tiny_sd3_clip(CLIP_G_WIDTH, True, seed), tiny_sd3_t5(seed)]
    name = "sd3.5_tiny.safetensors" if dual_attention else "sd3_tiny.safetensors"
    paths["checkpoint"] = ckpt.save_sd3_single_file(
        tiny_sd3_transformer(dual_attention, seed), tiny_sd3_vae(seed), encoders if with_text_encoders else None,
        os.path.join(folder, name))
    for key, encoder in zip(ckpt.TEXT_ENCODER_KEYS, encoders):
        paths[key] = ckpt.save_text_encoder_file(encoder, os.path.join(folder, f"{key}.safetensors"))
    return paths
