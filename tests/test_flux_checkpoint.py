"""FLUX.1 files: BFL transformer files written by our diffusers->BFL converter load back bit-exactly (with
and without the `model.diffusion_model.` prefix, bf16 and fp8), ae/clip_l/t5xxl files and the T5
tokenizer load offline, widths come from shapes, wrong files fail with clear errors, fp8 storage runs
on CPU."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models import flux_checkpoint as ckpt
from library.tiny_models.flux import save_tiny_flux_single_files, tiny_flux_transformer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_tiny_flux_single_files(str(tmp_path_factory.mktemp("flux_files")))


def assert_same_state(model, reference, dtype=None):
    got = model.state_dict()
    for name, weight in reference.state_dict().items():
        expected = weight if dtype is None else weight.to(dtype)
        assert got[name].dtype == expected.dtype, name
        assert torch.equal(got[name], expected), name


def test_bfl_names_and_layout(files):
    keys = set(load_file(files["transformer"]))
    assert {"double_blocks.0.img_attn.qkv.weight", "double_blocks.1.txt_attn.norm.key_norm.scale",
            "single_blocks.1.linear1.weight", "single_blocks.0.modulation.lin.bias", "guidance_in.in_layer.weight",
            "final_layer.adaLN_modulation.1.weight", "img_in.weight", "vector_in.out_layer.bias"} <= keys
    state = load_file(files["transformer"])
    reference = tiny_flux_transformer()
    # fused rows in BFL order: q, k, v, then the MLP input; final modulation halves as (shift, scale)
    single = reference.single_transformer_blocks[0]
    expected = torch.cat([single.attn.to_q.weight, single.attn.to_k.weight, single.attn.to_v.weight,
                          single.proj_mlp.weight])
    assert torch.equal(state["single_blocks.0.linear1.weight"], expected.detach())
    scale, shift = reference.norm_out.linear.weight.detach().chunk(2)
    assert torch.equal(state["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    assert ckpt.diffusers_to_bfl_module("transformer_blocks.3.attn.add_v_proj") == "double_blocks.3.txt_attn.qkv"
    assert ckpt.diffusers_to_bfl_module("single_transformer_blocks.2.proj_mlp") == "single_blocks.2.linear1"
    assert ckpt.diffusers_to_bfl_module("norm_out.linear") == "final_layer.adaLN_modulation.1"
    assert ckpt.rope_axes_for_head_dim(128) == (16, 56, 56) and ckpt.rope_axes_for_head_dim(16) == (4, 6, 6)


def test_transformer_round_trip_exact(files):
    model, is_schnell = ckpt.load_flux_transformer(files["transformer"])
    assert not is_schnell and model.config.num_layers == 2 and model.config.attention_head_dim == 16
    assert_same_state(model, tiny_flux_transformer())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_prefixed_low_precision_files_and_schnell(tmp_path, dtype):
    paths = save_tiny_flux_single_files(str(tmp_path), guidance_embeds=False, transformer_dtype=dtype,
                                        with_prefix=True)
    assert all(k.startswith("model.diffusion_model.") for k in load_file(paths["transformer"]))
    assert ckpt.is_schnell_file(paths["transformer"])
    model, is_schnell = ckpt.load_flux_transformer(paths["transformer"])
    assert is_schnell and not model.config.guidance_embeds
    assert_same_state(model, tiny_flux_transformer(guidance_embeds=False), dtype)


def test_text_encoders_and_ae_load_exactly(files):
    from library.models.t5_tokenizer import load_t5_tokenizer
    from library.tiny_models.sd import tiny_clip_text_model
    from library.tiny_models.flux import tiny_flux_ae, tiny_t5_encoder

    vae = ckpt.load_flux_ae(files["ae"])
    assert (vae.config.scaling_factor, vae.config.shift_factor, vae.config.latent_channels) == (0.3611, 0.1159, 16)
    assert_same_state(vae, tiny_flux_ae())
    assert_same_state(ckpt.load_clip_l(files["clip_l"]), tiny_clip_text_model())
    t5 = ckpt.load_t5xxl(files["t5xxl"])
    assert_same_state(t5, tiny_t5_encoder())
    assert "encoder.embed_tokens.weight" not in load_file(files["t5xxl"])  # tied to shared, as released files
    tokenizer = load_t5_tokenizer(files["t5_tokenizer"])
    ids = tokenizer(["a photo of a cat"], max_length=24, padding="max_length", truncation=True).input_ids[0]
    assert ids[-1] == 0 and 1 in ids and max(ids) < 256  # padded with <pad>, closed by </s>, fits the tiny T5
    ids = torch.tensor([ids])
    torch.testing.assert_close(t5(ids).last_hidden_state, tiny_t5_encoder()(ids).last_hidden_state, rtol=0, atol=0)


def test_fp8_t5_is_upcast(files, tmp_path):
    state = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(files["t5xxl"]).items()}
    save_file(state, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    t5 = ckpt.load_t5xxl(str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"), torch.bfloat16)
    assert t5.shared.weight.dtype == torch.bfloat16
    assert torch.equal(t5.shared.weight, state["shared.weight"].to(torch.bfloat16))


def test_wrong_and_missing_files(files, tmp_path):
    sd_file = str(tmp_path / "sd15.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, sd_file)
    with pytest.raises(UserError, match="looks like a Stable Diffusion 1.x checkpoint; use sd_train_network.py"):
        ckpt.load_flux_transformer(sd_file)
    with pytest.raises(UserError, match="also pass --clip_l, --ae"):
        ckpt.load_flux_models(files["transformer"], t5xxl=files["t5xxl"])
    with pytest.raises(UserError, match="--ae .* holds no autoencoder"):
        ckpt.load_flux_ae(files["clip_l"])
    with pytest.raises(UserError, match="--t5_tokenizer .*neither spiece.model nor tokenizer.json"):
        from library.models.t5_tokenizer import load_t5_tokenizer

        load_t5_tokenizer(str(tmp_path))
    truncated = {k: v for k, v in load_file(files["transformer"]).items() if k != "single_blocks.1.linear2.weight"}
    save_file(truncated, str(tmp_path / "truncated.safetensors"))
    with pytest.raises(UserError, match="missing the FLUX transformer tensor single_blocks.1.linear2.weight"):
        ckpt.load_flux_transformer(str(tmp_path / "truncated.safetensors"))


def test_t5_tokenizer_needs_a_source_offline(monkeypatch, tmp_path):
    from library.models.t5_tokenizer import load_t5_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(UserError, match="pass --t5_tokenizer"):
        load_t5_tokenizer(None, None)


def test_fp8_storage_runs_on_cpu():
    from library.families.flux import FluxFamily
    from library.quantized_base import QuantizedLinear, quantize_linears

    reference, model = tiny_flux_transformer(), tiny_flux_transformer()
    quantize_linears(model, "fp8", keep=FluxFamily.full_precision_modules)
    to_q = model.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, QuantizedLinear) and to_q.weight_q0.view(torch.float8_e4m3fn).dtype == torch.float8_e4m3fn
    assert type(model.x_embedder) is torch.nn.Linear and model.x_embedder.weight.dtype == torch.float32  # kept
    assert model.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
    inputs = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)
    with torch.no_grad():
        got, expected = model(**inputs)[0], reference(**inputs)[0]
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()  # fp8 rounding, not garbage


def test_family_saves_a_trained_transformer_as_a_bfl_file(tmp_path):
    from library.families.base import ModelComponents
    from library.families.flux import FluxFamily

    parts = ModelComponents(denoiser=tiny_flux_transformer(seed=4), vae=None, text_encoders=[], tokenizers=[],
                            noise_scheduler=None)
    path = str(tmp_path / "flux1-finetune.safetensors")
    FluxFamily().save_full_model(parts, path, "safetensors", torch.bfloat16, {"ss_steps": 10})
    model, _ = ckpt.load_flux_transformer(path)
    assert_same_state(model, tiny_flux_transformer(seed=4), torch.bfloat16)
    FluxFamily().save_full_model(parts, str(tmp_path / "folder"), "diffusers", torch.bfloat16, {})
    from diffusers import FluxTransformer2DModel
    assert_same_state(FluxTransformer2DModel.from_pretrained(str(tmp_path / "folder"), torch_dtype=torch.bfloat16), tiny_flux_transformer(seed=4),
                      torch.bfloat16)
