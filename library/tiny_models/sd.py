"""A tiny randomly initialised SD 1.5-layout model (UNet, VAE, CLIP), for tests and the quickstart.

The other tiny families reuse its VAE and CLIP builders. Widths of 32-64 channels: small enough
that one CPU training step takes well under a second, but with the same module names as the real
checkpoints so LoRA key names and checkpoint converters are exercised for real. `save_tiny_sd15_pipeline(folder)` writes a complete diffusers folder that every
entry script accepts as `--pretrained_model_name_or_path`.
"""

from __future__ import annotations

import os


def tiny_sd15_unet(cross_attention_dim: int = 32, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def tiny_vae(latent_channels: int = 4, layers_per_block: int = 2, seed: int = 0, **extra):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), layers_per_block=layers_per_block,
        norm_num_groups=32, sample_size=64, **extra,
    )


def tiny_clip_text_model(hidden_size: int = 32, with_projection: bool = False, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77,
        hidden_act="gelu" if with_projection else "quick_gelu", projection_dim=hidden_size,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if with_projection else 49407,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def tiny_sd15_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline with tiny random weights and the real CLIP tokenizer."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from library.models.clip_tokenizer import build_clip_tokenizer

    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(seed=seed), text_encoder=tiny_clip_text_model(seed=seed),
        tokenizer=build_clip_tokenizer(), unet=tiny_sd15_unet(seed=seed), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_sd15_pipeline(folder: str, seed: int = 0, prediction_type: str = "epsilon") -> str:
    os.makedirs(folder, exist_ok=True)
    tiny_sd15_pipeline(seed=seed, prediction_type=prediction_type).save_pretrained(folder)
    return folder
