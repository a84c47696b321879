"""Lumina 2 original single files <-> diffusers (our converter, widths from shapes), Gemma-2 files, and
the family's flow-matching convention (model time 1 - sigma, output negated as Lumina2Pipeline does)."""

import torch
from safetensors.torch import load_file

from library.models import lumina_checkpoint as ckpt
from library.tiny_models.lumina import save_tiny_lumina_single_files, tiny_gemma2, tiny_lumina_transformer


def test_original_single_file_round_trip_is_exact(tmp_path):
    files = save_tiny_lumina_single_files(str(tmp_path), with_prefix=True)
    keys = load_file(files["transformer"])
    assert keys["model.diffusion_model.layers.0.attention.qkv.weight"].shape == (64 + 2 * 32, 64)
    assert torch.equal(keys["model.diffusion_model.norm_final.weight"], torch.ones(64))
    assert "model.diffusion_model.context_refiner.0.attention_norm1.weight" in keys
    assert not any("adaLN" in k for k in keys if ".context_refiner." in k)
    loaded = ckpt.load_lumina_transformer(files["transformer"])
    assert loaded.config.num_kv_heads == 2 and list(loaded.config.axes_dim_rope) == [4, 6, 6]
    reference = tiny_lumina_transformer().state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
    gemma = ckpt.load_gemma2(files["gemma2"])
    assert all(torch.equal(gemma.state_dict()[k], v) for k, v in tiny_gemma2().state_dict().items())


def test_predict_uses_lumina_time_direction():
    from library.families.lumina import LuminaFamily
    from library.families.base import ModelComponents

    family = LuminaFamily()
    transformer = tiny_lumina_transformer()
    parts = ModelComponents(denoiser=transformer, vae=None, text_encoders=[], tokenizers=[], noise_scheduler=None)
    noisy, sigma = torch.randn(1, 16, 8, 8), torch.tensor([0.3])
    conditioning = {"gemma2_hidden_states": torch.randn(1, 5, 32), "gemma2_attention_mask": torch.ones(1, 5)}
    with torch.no_grad():
        got = family.predict(parts, noisy, 1 - sigma, conditioning, {})
        raw = transformer(hidden_states=noisy, timestep=1 - sigma, encoder_hidden_states=conditioning["gemma2_hidden_states"],
                          encoder_attention_mask=torch.ones(1, 5, dtype=torch.long), return_dict=False)[0]
    torch.testing.assert_close(got, raw, rtol=0, atol=0)  # Lumina's own velocity; the noise scheme knows its sign
