"""A tiny FLUX.1 with the real module layout, for tests and the FLUX demo (nothing downloaded).

Sizes: transformer inner width 32 (2 heads of 16, rotary axes (4, 6, 6)), 64 packed input
channels (16 latent channels x 2x2), T5 width 32 = joint_attention_dim, CLIP-L width 32 =
pooled_projection_dim, a 16-channel AE with FLUX's scale and shift. The CLIP tokenizer is the real one
(library/models/clip_tokenizer.py); the T5 tokenizer is a small sentencepiece model trained on the fly.
`save_tiny_flux_pipeline(folder)` writes a diffusers FluxPipeline folder; `save_tiny_flux_single_files`
writes what users download from BFL/ComfyUI (flux1 transformer, ae, clip_l, t5xxl) plus a tokenizer folder;
`python -m library.tiny_models.flux FOLDER` writes them with demo images (docs/flux.md).
"""

from __future__ import annotations

import os

TINY_T5_VOCAB = 256


def tiny_flux_transformer(guidance_embeds: bool = True, num_layers: int = 2, num_single_layers: int = 2, seed: int = 0):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )


def tiny_flux_ae(seed: int = 0):
    from library.models.flux_checkpoint import FLUX_AE_SCALING_FACTOR, FLUX_AE_SHIFT_FACTOR
    from library.tiny_models.sd import tiny_vae

    return tiny_vae(latent_channels=16, layers_per_block=2, seed=seed, scaling_factor=FLUX_AE_SCALING_FACTOR,
                    shift_factor=FLUX_AE_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)


def tiny_t5_encoder(seed: int = 0):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=TINY_T5_VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
        use_cache=False,
    ))


def tiny_t5_tokenizer(folder: str):
    """A sentencepiece T5 tokenizer trained into `folder` (spiece.model), loaded like a real one."""
    from library.models.t5_tokenizer import load_t5_tokenizer, train_sentencepiece_t5_tokenizer

    train_sentencepiece_t5_tokenizer(folder, vocab_size=TINY_T5_VOCAB)
    return load_t5_tokenizer(folder)


def tiny_flux_pipeline(tokenizer_folder: str, guidance_embeds: bool = True, seed: int = 0, num_layers: int = 2,
                       num_single_layers: int = 2):
    from diffusers import FluxPipeline

    from library.models.clip_tokenizer import build_clip_tokenizer
    from library.models.flux_checkpoint import flux_sampling_scheduler
    from library.tiny_models.sd import tiny_clip_text_model

    return FluxPipeline(
        scheduler=flux_sampling_scheduler(), vae=tiny_flux_ae(seed), text_encoder=tiny_clip_text_model(seed=seed),
        tokenizer=build_clip_tokenizer(), text_encoder_2=tiny_t5_encoder(seed),
        tokenizer_2=tiny_t5_tokenizer(tokenizer_folder), transformer=tiny_flux_transformer(guidance_embeds, num_layers, num_single_layers, seed),
    )


def save_tiny_flux_pipeline(folder: str, guidance_embeds: bool = True, seed: int = 0, num_layers: int = 2,
                            num_single_layers: int = 2) -> str:
    """A complete diffusers FluxPipeline folder (dev-like with guidance, schnell-like without; more double
    and single blocks for block-swap runs)."""
    import tempfile

    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        tiny_flux_pipeline(tokenizer_folder, guidance_embeds, seed, num_layers, num_single_layers).save_pretrained(folder)
    return folder


def save_tiny_flux_single_files(folder: str, guidance_embeds: bool = True, seed: int = 0,
                                transformer_dtype=None, with_prefix: bool = False) -> dict[str, str]:
    """flux1 transformer (BFL layout), ae, clip_l and t5xxl files plus a T5 tokenizer folder, as users
    download them; returns {"transformer", "ae", "clip_l", "t5xxl", "t5_tokenizer"} -> path."""
    from library.models import flux_checkpoint as ckpt
    from library.tiny_models.sd import tiny_clip_text_model

    os.makedirs(folder, exist_ok=True)
    name = "flux1-dev" if guidance_embeds else "flux1-schnell"
    paths = {"t5_tokenizer": os.path.join(folder, "t5_tokenizer")}
    from library.models.t5_tokenizer import train_sentencepiece_t5_tokenizer

    train_sentencepiece_t5_tokenizer(paths["t5_tokenizer"], vocab_size=TINY_T5_VOCAB)
    paths["transformer"] = ckpt.save_flux_transformer_bfl(
        tiny_flux_transformer(guidance_embeds, seed=seed), os.path.join(folder, f"{name}.safetensors"),
        dtype=transformer_dtype, with_prefix=with_prefix)
    paths["ae"] = ckpt.save_flux_ae(tiny_flux_ae(seed), os.path.join(folder, "ae.safetensors"))
    paths["clip_l"] = ckpt.save_clip_l(tiny_clip_text_model(seed=seed), os.path.join(folder, "clip_l.safetensors"))
    paths["t5xxl"] = ckpt.save_t5xxl(tiny_t5_encoder(seed), os.path.join(folder, "t5xxl_fp16.safetensors"))
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m library.tiny_models.flux FOLDER`: the tiny model as BFL single files plus demo images,
    and the flux_train_network.py command that trains on them (docs/flux.md)."""
    import argparse

    from library.demo import write_demo_images

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("folder")
    folder = os.path.abspath(parser.parse_args(argv).folder)
    paths = save_tiny_flux_single_files(os.path.join(folder, "model"))
    images = write_demo_images(os.path.join(folder, "images"))
    print(f"python flux_train_network.py --pretrained_model_name_or_path {paths['transformer']} "
          f"--clip_l {paths['clip_l']} --t5xxl {paths['t5xxl']} --ae {paths['ae']} "
          f"--t5_tokenizer {paths['t5_tokenizer']} --train_data_dir {images} --resolution 64 "
          f"--output_dir {os.path.join(folder, 'out')} --output_name my_flux_lora --network_module networks.lora "
          "--network_dim 16 --network_alpha 16 --network_train_unet_only --learning_rate 1e-3 --max_train_steps 60 "
          "--cache_latents_to_disk --cache_text_encoder_outputs_to_disk --timestep_sampling shift "
          "--discrete_flow_shift 3.1582 --model_prediction_type raw --guidance_scale 1.0 --fp8_base "
          "--gradient_checkpointing --t5xxl_max_token_length 32")


if __name__ == "__main__":
    main()
