"""A tiny randomly initialised SDXL-layout model (real block layout and names), for tests and demos.

Sizes: CLIP-L stand-in of width 32, bigG stand-in of width 64 with a 64-wide
projection (the two widths must differ: diffusers tells the encoders of a single file apart by
them), a 3-level UNet with cross-attention width 96 (= 32 + 64) and size embedding input
6 * 8 + 64. Attention heads are 16 channels wide, the rule library/models/sgm_layout.py applies
to narrow UNets, so a tiny single file loads back to the same model.
`save_tiny_sdxl_pipeline(folder)` writes a complete diffusers folder every SDXL script accepts.
"""

from __future__ import annotations

import os

TE1_WIDTH, TE2_WIDTH, SIZE_EMBED_DIM = 32, 64, 8


def tiny_sdxl_unet(seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=TE1_WIDTH + TE2_WIDTH, addition_embed_type="text_time",
        addition_time_embed_dim=SIZE_EMBED_DIM, projection_class_embeddings_input_dim=6 * SIZE_EMBED_DIM + TE2_WIDTH,
        norm_num_groups=32,
    )


def sdxl_inference_scheduler(prediction_type: str = "epsilon"):
    """The Euler scheduler SDXL base ships for sampling (training uses DDPM with the same betas)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type,
    )


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionXLPipeline with tiny random weights and the real CLIP tokenizers."""
    from diffusers import StableDiffusionXLPipeline

    from library.models.clip_tokenizer import build_clip_tokenizer
    from library.models.sgm_layout import SDXL_VAE_SCALING_FACTOR
    from library.tiny_models.sd import tiny_clip_text_model, tiny_vae

    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed=seed, scaling_factor=SDXL_VAE_SCALING_FACTOR),
        text_encoder=tiny_clip_text_model(hidden_size=TE1_WIDTH, seed=seed),
        text_encoder_2=tiny_clip_text_model(hidden_size=TE2_WIDTH, with_projection=True, seed=seed + 1),
        tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=tiny_sdxl_unet(seed=seed), scheduler=sdxl_inference_scheduler(prediction_type),
        add_watermarker=False,
    )


def save_tiny_sdxl_pipeline(folder: str, seed: int = 0, prediction_type: str = "epsilon") -> str:
    os.makedirs(folder, exist_ok=True)
    tiny_sdxl_pipeline(seed=seed, prediction_type=prediction_type).save_pretrained(folder)
    return folder
