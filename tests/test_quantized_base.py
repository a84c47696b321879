"""Frozen base weights in fp8 / int8 / nf4 (library/quantized_base.py, --fp8_base, --base_weights_dtype,
--text_encoder_weights_dtype): storage dtypes and bytes, dequantized weights within each format's precision,
gradients through the quantized layers to the input and LoRA, only the storage kept for backward, block swap
moving quantized storage without a second copy, LoRA training on the tiny model of every family with each
storage (its file applied exactly by diffusers), and the refused combinations."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script
from library.cli import run_training
from library.config.arguments import parse_training_args
from library.errors import UserError
from library.families import get_family
from library.quantized_base import FORMATS, QuantizedLinear, quantize_linears, quantized_layers
from library.offload import HostTransferBackend, enable_block_swap

STORAGES = ("fp8", "int8", "nf4")
FLUX_KEEP = (r"^(x_embedder|context_embedder|time_text_embed|norm_out|proj_out)\b",)


def linear(out_features=96, in_features=128, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features)
    torch.nn.init.normal_(layer.weight, std=0.02)
    return layer


@pytest.mark.parametrize("storage", STORAGES)
def test_storage_dtypes_bytes_and_dequantized_error(storage):
    layer = linear()
    weight = layer.weight.detach().clone()
    QuantizedLinear.convert(layer, FORMATS[storage])
    assert layer.weight is None and all(not p.is_floating_point() for p in layer.parts())
    expected_bytes = {"fp8": 96 * 128, "int8": 96 * 128 + 4 * 96, "nf4": 96 * 128 // 2 + 4 * 96 * 128 // 64}[storage]
    assert layer.storage_bytes() == expected_bytes
    error = (layer.dequantized_weight() - weight).norm() / weight.norm()
    assert 0 < error < FORMATS[storage].max_relative_error
    if storage == "int8":  # per row: |error| <= half a step of absmax / 127
        step = weight.abs().amax(dim=1, keepdim=True) / 127
        assert ((layer.dequantized_weight() - weight).abs() <= step / 2 + 1e-7).all()
    if storage == "fp8":  # round to nearest with 3 mantissa bits: relative error <= 2^-4 (normal range)
        normal = weight.abs() > 2 ** -6
        assert ((layer.dequantized_weight() - weight).abs()[normal] <= weight.abs()[normal] / 16).all()


@pytest.mark.parametrize("storage", STORAGES)
def test_gradients_reach_the_input_and_only_storage_is_saved(storage):
    layer = linear()
    QuantizedLinear.convert(layer, FORMATS[storage])
    reference = torch.nn.Linear(128, 96)
    reference.weight.data, reference.bias.data = layer.dequantized_weight(), layer.bias.detach().clone()
    x = torch.randn(4, 128, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert sum(t.numel() * t.element_size() for t in saved) == layer.storage_bytes()  # no dequantized copy
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-6)
    out.square().sum().backward()
    expected = torch.autograd.grad(reference(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-5)
    assert layer.bias.grad is None and all(p.grad is None for p in layer.parts())


def test_conversion_keeps_the_layer_object_and_its_lora_hook():
    from library.families.base import LoraTarget
    from networks.lora import create_network

    model = torch.nn.Sequential(torch.nn.Sequential(linear(32, 32, 1)))
    target = LoraTarget(prefix="lora_unet", root=model, container_classes=("Sequential",))
    network = create_network([target], network_dim=4, network_alpha=4, train_text_encoder=False)
    network.apply_to()
    for module in network.modules_by_name.values():
        torch.nn.init.normal_(module.lora_up.weight, std=0.1)
    layer = model[0][0]
    report = quantize_linears(model, "nf4")
    assert report.layers == 1 and model[0][0] is layer and isinstance(layer, QuantizedLinear)
    x = torch.randn(2, 32)
    out = model(x)
    lora = next(iter(network.modules_by_name.values()))
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias) +
                               lora.lora_delta(x), rtol=0, atol=1e-5)
    out.sum().backward()
    assert lora.lora_down.weight.grad.abs().sum() > 0


def test_keep_patterns_and_model_dtype():
    from library.families.flux import FluxFamily
    from library.tiny_models.flux import tiny_flux_transformer

    model = tiny_flux_transformer()
    report = quantize_linears(model, "int8", keep=FluxFamily.full_precision_modules)
    kept = [p for p, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert kept and all(p.split(".")[0] in ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")
                        for p in kept)
    assert report.layers == len(quantized_layers(model)) and report.bytes_after < report.bytes_before / 3.5
    model.to(torch.bfloat16)  # a dtype cast leaves the integer storage alone
    assert model.dtype == torch.bfloat16
    assert {p.dtype for layer in quantized_layers(model) for p in layer.parts()} == {torch.int8, torch.int32}


def test_fp8_block_swap_keeps_one_fp8_copy_per_resident_block():
    """diffusers' layerwise casting (the old --fp8_base) replaced a resident swapped block's weights by a new
    tensor at every cast, beside the swap's device buffer, and autograd kept the upcast weights: two copies.
    QuantizedLinear never replaces its parameters: every parameter of a resident block is a swap buffer."""
    from test_flux_block_swap import lora_model, step, swap

    transformer, network = lora_model(False)
    quantize_linears(transformer, "fp8", keep=FLUX_KEEP)
    swapper = swap(transformer, 4, HostTransferBackend())
    step(transformer, network)
    for group, blocks in enumerate(swapper.blocks):
        for index in swapper.resident_blocks(group):
            state = blocks[index]
            params = {p.untyped_storage().data_ptr() for p in state.params}
            assert params == {b.untyped_storage().data_ptr() for b in state.buffers}
            linear_bytes = sum(p.numel() for layer in quantized_layers(swapper.modules[group][index])
                               for p in layer.parts())
            weights = sum(layer.in_features * layer.out_features
                          for layer in quantized_layers(swapper.modules[group][index]))
            assert linear_bytes == weights  # one byte per weight
    assert swapper.unscheduled_loads == 0


@pytest.mark.parametrize("storage", ("int8", "nf4"))
def test_quantized_blocks_swap_with_the_same_loss_and_gradients(storage):
    from test_flux_block_swap import PoisonBackend, lora_model, step, swap

    keep = FLUX_KEEP
    reference, reference_network = lora_model(True)
    transformer, network = lora_model(True)
    quantize_linears(reference, storage, keep=keep)
    quantize_linears(transformer, storage, keep=keep)
    expected_loss, expected = step(reference, reference_network)
    swap(transformer, 4, PoisonBackend())
    loss, grads = step(transformer, network)
    assert torch.equal(loss, expected_loss) and grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("storage", STORAGES)
def test_large_text_encoders_quantize_and_still_encode(storage):
    from library.tiny_models.flux import tiny_t5_encoder
    from library.tiny_models.lumina import tiny_gemma2

    for encoder in (tiny_t5_encoder(), tiny_gemma2()):
        reference = type(encoder)(encoder.config)
        reference.load_state_dict(encoder.state_dict())
        quantize_linears(encoder, storage)
        ids = torch.randint(3, 200, (2, 12))
        with torch.no_grad():
            got, expected = encoder(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state
        assert quantized_layers(encoder)
        error = (got - expected).norm() / expected.norm()
        assert error < 4 * FORMATS[storage].max_relative_error, error


# ---- flags --------------------------------------------------------------------------------------------

COMMON = ["--train_data_dir", "x", "--output_dir", "o", "--pretrained_model_name_or_path", "m"]


def settings(family, mode, *flags):
    configured, _ = parse_training_args(get_family(family), mode, [*COMMON, *flags])
    return configured.denoiser_storage, configured.text_encoder_storage


def test_flag_meanings():
    assert settings("flux", "network", "--fp8_base") == ("fp8", "fp8")  # sd-scripts: the text encoders too
    assert settings("flux", "network", "--fp8_base_unet") == ("fp8", None)
    assert settings("flux", "network", "--fp8_base", "--cache_text_encoder_outputs", "--network_train_unet_only") == (
        "fp8", None)
    assert settings("sd3", "network", "--base_weights_dtype", "nf4", "--text_encoder_weights_dtype", "int8") == (
        "nf4", "int8")
    assert settings("sd", "network", "--fp8_base") == ("fp8", None)  # CLIP stays in the training dtype


@pytest.mark.parametrize("family, mode, flags, message", [
    ("flux", "full", ["--base_weights_dtype", "nf4"], "--base_weights_dtype nf4 stores the frozen denoiser in nf4, but a full"),
    ("sdxl", "full", ["--fp8_base"], "--fp8_base stores the frozen denoiser in fp8, but a full fine-tune"),
    ("flux", "network", ["--fp8_base", "--base_weights_dtype", "int8"], "keep only one of them"),
    ("sdxl", "network", ["--text_encoder_weights_dtype", "fp8"], "SDXL has no large text encoder"),
    ("sd3", "network", ["--text_encoder_weights_dtype", "nf4", "--cache_text_encoder_outputs", "--network_train_unet_only"],
     "has no effect with"),
    ("sd3", "full", ["--text_encoder_weights_dtype", "nf4"], "a full fine-tune saves its text encoders"),
])
def test_bad_combinations_are_refused(family, mode, flags, message):
    with pytest.raises(UserError, match=message):
        settings(family, mode, *flags)


def test_the_script_refuses_with_one_line(tmp_path):
    result = run_script("sdxl_train.py", *COMMON, "--base_weights_dtype", "nf4")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "full fine-tune trains those weights" in result.stderr


# ---- LoRA training on quantized bases -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from library.tiny_models.flux import save_tiny_flux_pipeline
    from library.tiny_models.lumina import save_tiny_lumina_pipeline
    from library.tiny_models.sd import save_tiny_sd15_pipeline
    from library.tiny_models.sd3 import save_tiny_sd3_pipeline
    from library.tiny_models.sdxl import save_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("quantized_tiny")
    return {"sd": save_tiny_sd15_pipeline(str(root / "sd")), "sdxl": save_tiny_sdxl_pipeline(str(root / "sdxl")),
            "flux": save_tiny_flux_pipeline(str(root / "flux")),
            "sd3": save_tiny_sd3_pipeline(str(root / "sd3")), "lumina": save_tiny_lumina_pipeline(str(root / "lumina"))}


FAMILY_FLAGS = {  # each family's LoRA run: text encoders run (not cached) so the large ones are quantized too
    "sd": [], "sdxl": [],
    "flux": ["--t5xxl_max_token_length", "16", "--network_train_unet_only", "--save_lora_format", "diffusers"],
    "sd3": ["--t5xxl_max_token_length", "16", "--network_train_unet_only", "--save_lora_format", "diffusers"],
    "lumina": ["--gemma2_max_token_length", "48", "--network_train_unet_only", "--save_lora_format", "diffusers"],
}


def train_lora(family, folder, images, output_dir, *extra):
    run_training(family, "network", [
        "--pretrained_model_name_or_path", folder, "--train_data_dir", images, "--resolution", "64",
        "--output_dir", str(output_dir), "--output_name", "out", "--seed", "7", "--train_batch_size", "2",
        "--learning_rate", "1e-3", "--max_train_steps", "2", "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "2", *FAMILY_FLAGS[family], *extra])
    return str(output_dir / "out.safetensors")


def assert_peft_file_applies(family, folder, path):
    """diffusers' pipeline loads the PEFT-keyed file and fuses every module: W' == W + B @ A (alpha folded)."""
    import diffusers

    pipeline_class = {"flux": diffusers.FluxPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
                      "lumina": diffusers.Lumina2Pipeline}[family]
    tensors = load_file(path)
    pipe = pipeline_class.from_pretrained(folder, local_files_only=True)
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    layer = lambda p: pipe.transformer.get_submodule(p.removeprefix("transformer."))  # noqa: E731
    before = {p: layer(p).weight.detach().clone() for p in paths}
    pipe.load_lora_weights(path)
    pipe.fuse_lora(components=["transformer"])
    for p in paths:
        delta = tensors[f"{p}.lora_B.weight"] @ tensors[f"{p}.lora_A.weight"]
        torch.testing.assert_close(layer(p).weight.detach(), before[p] + delta, rtol=0, atol=1e-6)
    return len(paths)


@pytest.mark.parametrize("family", ("sd", "sdxl", "flux", "sd3", "lumina"))
@pytest.mark.parametrize("storage", STORAGES)
def test_lora_on_a_quantized_base_trains_and_loads_in_diffusers(family, storage, tiny_models, demo_image_root, tmp_path,
                                                                 caplog):
    from lora_checks import assert_diffusers_applies_every_module, sdxl_layers_by_kohya_name

    folder = tiny_models[family]
    extra = ["--base_weights_dtype", storage]
    if family in ("flux", "sd3", "lumina"):
        extra += ["--text_encoder_weights_dtype", storage]
    with caplog.at_level(logging.INFO, logger="library.quantized_base"):
        path = train_lora(family, folder, demo_image_root, tmp_path / "quantized", *extra)
    stored = [r.getMessage() for r in caplog.records if r.name == "library.quantized_base"]
    assert len(stored) == (1 if family in ("sd", "sdxl") else 2)  # the denoiser (+ T5 / Gemma-2)
    assert all(m.startswith(f"{storage} base weights: ") and " 0 Linear" not in m for m in stored)
    tensors = load_file(path)
    reference = load_file(train_lora(family, folder, demo_image_root, tmp_path / "plain")) if storage == "nf4" else None
    if reference is not None:  # the same modules, names and shapes as a run on the unquantized base
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in reference.items()}
    ups = [v for k, v in tensors.items() if "lora_up" in k or "lora_B" in k]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # gradients reached the LoRA through the quantized layers
    if family == "sd":
        assert assert_diffusers_applies_every_module(_pipeline("StableDiffusionPipeline", folder), path) > 0
    elif family == "sdxl":
        assert assert_diffusers_applies_every_module(_pipeline("StableDiffusionXLPipeline", folder), path,
                                                     sdxl_layers_by_kohya_name) > 0
    else:
        assert assert_peft_file_applies(family, folder, path) > 0


def _pipeline(name, folder):
    import diffusers

    return lambda: getattr(diffusers, name).from_pretrained(folder, local_files_only=True)


def test_generate_renders_on_a_quantized_base_and_refuses_a_sweep(tiny_models, tmp_path, caplog):
    from tools.generate import generate

    common = ["--family", "flux", "--pretrained_model_name_or_path", tiny_models["flux"], "--W", "64", "--H", "64",
              "--steps", "2", "--prompt", "a cat", "--seed", "3", "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="library.quantized_base"):
        images = generate([*common, "--outdir", str(tmp_path / "q"), "--base_weights_dtype", "nf4",
                           "--text_encoder_weights_dtype", "int8"])
    stored = sorted(r.getMessage().split(":")[0] for r in caplog.records if r.name == "library.quantized_base")
    assert stored == ["int8 base weights", "nf4 base weights"] and len(images) == 1
    with pytest.raises(UserError, match="--ratios_sweep changes weights that --fp8_base/--base_weights_dtype"):
        generate([*common, "--outdir", str(tmp_path / "s"), "--fp8_base", "--loras", __file__, "--ratios_sweep", "0,1"])
