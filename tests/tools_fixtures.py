"""Tiny checkpoints' components and random (non-zero) LoRA files shared by the tools' tests."""

import torch

from library.families.base import ModelComponents
from networks.lora import create_network


def pipeline_components(pipe) -> ModelComponents:
    """ModelComponents of an SD or SDXL pipeline (text encoders in file order)."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if hasattr(pipe, "tokenizer_2") else [])
    return ModelComponents(denoiser=pipe.unet, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
                           noise_scheduler=pipe.scheduler)


def write_random_lora(pipe, path, seed, dim, alpha, conv_dim=None, unet_only=False, dtype=None, family=None) -> str:
    """A kohya LoRA on the family's targets, every weight random so each module changes its layer."""
    from library.families.sd import SDFamily

    family = family or SDFamily()
    network_args = {"conv_dim": str(conv_dim), "conv_alpha": "1"} if conv_dim else None
    network = create_network(family.lora_targets(pipeline_components(pipe)), network_dim=dim, network_alpha=alpha,
                             network_args=network_args, train_text_encoder=not unet_only)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in network.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    network.save_weights(str(path), dtype, {"ss_base_model_version": family.base_model_version})
    return str(path)
