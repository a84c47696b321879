"""LoHa, LoKr and DoRA end to end: each trains 2 steps on the tiny model of every family through the real
training code, and its file continues (--network_weights), merges (tools/merge_lora.py), fuses
(tools/generate.py's FusedLoras), converts (tools/convert_lora.py) and shows (tools/show_metadata.py).

Merged and fused weights are compared with the variants' formulas written out here (LoHa: Hadamard
product of two low-rank products; DoRA: W' = (W + delta) * dora_scale / column norms, over the fused
qkv weight where the file fuses it); the formulas themselves are checked against PEFT in
test_lora_variants.py.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.cli import run_training
from library.errors import UserError
from library.families import get_family
from library.lora_formats import detect_family, read_lora

VARIANTS = {
    "loha": ["--network_module", "lycoris.kohya", "--network_args", "algo=loha", "preset=full"],
    "lokr": ["--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "factor=4", "dora_wd=True"],
    "dora": ["--network_module", "networks.lora", "--network_args", "use_dora=True"],
}
ZERO_STARTED = {"loha": ".hada_w2_a", "lokr": (".lokr_w2", ".lokr_w2_a"), "dora": ".lora_up.weight"}
FAMILY_FLAGS = {"sd": [], "sdxl": [], "flux": ["--t5xxl_max_token_length", "16"],
                "sd3": ["--t5xxl_max_token_length", "16"], "lumina": ["--gemma2_max_token_length", "48"]}
# one module name each family's files must have (the fused ones for FLUX, SD3 and Lumina 2)
EXPECTED_NAME = {"sd": "lora_unet_down_blocks_0_attentions_0_proj_in",
                 "sdxl": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "flux": "lora_unet_single_blocks_0_linear1", "sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv",
                 "lumina": "lora_unet_layers_0_attention_qkv"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd15_folder, tiny_sdxl_folder):
    from library.demo import write_demo_images
    from library.tiny_models.flux import save_tiny_flux_pipeline, save_tiny_flux_single_files
    from library.tiny_models.lumina import save_tiny_lumina_pipeline
    from library.tiny_models.sd3 import save_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("variants")
    return {"sd": tiny_sd15_folder, "sdxl": tiny_sdxl_folder, "flux": save_tiny_flux_pipeline(str(root / "flux")),
            "flux_files": save_tiny_flux_single_files(str(root / "flux_files")),
            "sd3": save_tiny_sd3_pipeline(str(root / "sd3")), "lumina": save_tiny_lumina_pipeline(str(root / "lumina")),
            "images": write_demo_images(str(root / "images"), repeats=1), "root": root}


@pytest.fixture(scope="module")
def trained(models):
    """train(family, variant) -> path of its LoRA file; each run happens once per module."""
    done = {}

    def train(family: str, variant: str) -> str:
        if (family, variant) not in done:
            out = models["root"] / f"{family}_{variant}"
            run_training(family, "network", [
                "--pretrained_model_name_or_path", models[family], "--train_data_dir", models["images"],
                "--resolution", "64", "--output_dir", str(out), "--output_name", "out", "--seed", "7",
                "--train_batch_size", "2", "--learning_rate", "1e-2", "--max_train_steps", "2",
                "--network_dim", "4", "--network_alpha", "2", *FAMILY_FLAGS[family], *VARIANTS[variant]])
            done[(family, variant)] = str(out / "out.safetensors")
        return done[(family, variant)]

    return train


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(FAMILY_FLAGS))
def test_variant_trains_on_every_family(trained, family, variant):
    path = trained(family, variant)
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    lora = read_lora(path)
    assert lora.layout == "kohya" and detect_family(tensors) == family
    assert EXPECTED_NAME[family] in lora.modules
    if (family, variant) == ("sd", "loha"):  # preset=full (the default) also trains the 3x3 convolutions
        assert "lora_unet_down_blocks_0_resnets_0_conv1" in lora.modules
    kinds = {pair.label for pair in lora.modules.values()}
    assert kinds == {{"loha": "LoHa", "lokr": "LoKr + DoRA", "dora": "LoRA + DoRA"}[variant]}
    assert all(f"{name}.alpha" in tensors for name in lora.modules)
    trained_modules = [key for key in tensors if key.endswith(ZERO_STARTED[variant]) and tensors[key].any()]
    assert len(trained_modules) > len(lora.modules) / 2  # they started at zero: training moved them
    module = "lycoris.kohya" if variant != "dora" else "networks.lora"
    assert metadata["ss_network_module"] == module
    args = json.loads(metadata["ss_network_args"])
    assert {k: args[k] for k in ("algo", "use_dora") if k in args} == \
        {"loha": {"algo": "loha"}, "lokr": {"algo": "lokr"}, "dora": {"use_dora": "True"}}[variant]


def sd_components(folder):
    from diffusers import StableDiffusionPipeline

    from tools_fixtures import pipeline_components

    return pipeline_components(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True))


def flux_components(folder):
    from diffusers import FluxPipeline

    from library.families.base import ModelComponents

    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    return ModelComponents(denoiser=pipe.transformer, vae=None, text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
                           tokenizers=[None, None], noise_scheduler=None)


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_network_weights_continue_exactly_and_mismatches_are_refused(trained, models, variant):
    from networks import lycoris

    path = trained("sd", variant)
    family = get_family("sd")
    args = VARIANTS[variant][VARIANTS[variant].index("--network_args") + 1:]
    network_args = dict(entry.split("=") for entry in args)
    targets = family.lora_targets(sd_components(models["sd"]))
    network = lycoris.create_network(targets, network_dim=4, network_alpha=2, network_args=network_args)
    assert network.load_weights(path) == len(read_lora(path).modules)
    state = network.state_dict()
    for key, tensor in load_file(path).items():
        assert torch.equal(state[key], tensor), key
    other = {"algo": "lokr" if variant == "loha" else "loha"}
    with pytest.raises(UserError, match="trained with another algo"):
        lycoris.create_network(targets, network_dim=4, network_alpha=2, network_args=other).load_weights(path)
    with pytest.raises(UserError, match="alpha 2 but this network's is 1"):
        lycoris.create_network(targets, network_dim=4, network_alpha=1, network_args=network_args).load_weights(path)
    from networks.lora import create_network

    with pytest.raises(UserError, match="continue a LoHa/LoKr file with --network_module lycoris.kohya"):
        create_network(targets, network_dim=4, network_alpha=2).load_weights(path)


def loha_change(tensors, name, shape):
    rank = tensors[f"{name}.hada_w1_b"].shape[0]
    product = (tensors[f"{name}.hada_w1_a"] @ tensors[f"{name}.hada_w1_b"]) * \
        (tensors[f"{name}.hada_w2_a"] @ tensors[f"{name}.hada_w2_b"])
    return product.reshape(shape) * tensors[f"{name}.alpha"].item() / rank


def dora_weight(weight, tensors, name):
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    changed = weight + up @ down * tensors[f"{name}.alpha"].item() / down.shape[0]
    scale = tensors[f"{name}.dora_scale"][0]
    return torch.stack([changed[:, i] * scale[i] / changed[:, i].norm() for i in range(changed.shape[1])], dim=1)


def test_merge_loha_into_sd_checkpoint_equals_w_plus_delta(trained, models, tmp_path):
    from diffusers import StableDiffusionPipeline

    from library.models.sd_checkpoint import save_sd15_single_file
    from library.safetensors_stream import read_header
    from tools.merge_lora import merge_lora

    lora = trained("sd", "loha")
    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], local_files_only=True)
    single = save_sd15_single_file(pipe, str(tmp_path / "base.safetensors"))
    merged = str(tmp_path / "merged.safetensors")
    merge_lora(["--model", single, "--loras", lora, "--ratios", "0.7", "--save_to", merged])
    before, after, tensors = load_file(single), load_file(merged), load_file(lora)
    slices = get_family("sd").lora_file_layout().checkpoint_slices(read_header(single).meta_tensors(), "checkpoint")
    checked = 0
    for tensor_name, pieces in slices.items():
        for piece in pieces:
            if f"{piece.lora_name}.hada_w1_a" not in tensors:
                continue
            weight = before[tensor_name].float()
            target = weight if piece.rows is None else weight[piece.rows[0]:piece.rows[1]]
            expected = target + 0.7 * loha_change(tensors, piece.lora_name, target.shape)
            got = after[tensor_name].float()
            got = got if piece.rows is None else got[piece.rows[0]:piece.rows[1]]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=tensor_name)
            checked += 1
    assert checked == len(read_lora(lora).modules)


def test_flux_dora_merges_into_the_fused_bfl_qkv_and_fuses_into_the_separate_layers(trained, models, tmp_path):
    from library.lora_fuse import FusedLoras
    from library.lora_merge import load_loras
    from tools.merge_lora import merge_lora

    lora = trained("flux", "dora")
    tensors = load_file(lora)
    files = models["flux_files"]
    transformer, out = files["transformer"], str(tmp_path / "merged.safetensors")
    merge_lora(["--family", "flux", "--model", transformer, "--loras", lora, "--save_to", out,
                "--text_encoders", files["clip_l"], "--save_text_encoders_to", str(tmp_path / "clip_l.safetensors")])
    before, after = load_file(transformer), load_file(out)
    for name, tensor_name in (("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight"),
                              ("lora_unet_single_blocks_1_linear1", "single_blocks.1.linear1.weight")):
        expected = dora_weight(before[tensor_name].float(), tensors, name)
        torch.testing.assert_close(after[tensor_name].float(), expected, rtol=1e-5, atol=1e-5, msg=tensor_name)

    family = get_family("flux")
    components = flux_components(models["flux"])
    block = components.denoiser.transformer_blocks[0].attn
    fused_before = torch.cat([block.to_q.weight, block.to_k.weight, block.to_v.weight]).detach().clone()
    FusedLoras(family, components, load_loras([lora], None, family), models["flux"], keep_originals=False) \
        .set_strength(1.0)
    expected = dora_weight(fused_before, tensors, "lora_unet_double_blocks_0_img_attn_qkv")
    fused_after = torch.cat([block.to_q.weight, block.to_k.weight, block.to_v.weight]).detach()
    torch.testing.assert_close(fused_after, expected, rtol=1e-5, atol=1e-5)


def test_sd_lokr_fuses_like_the_trained_network(trained, models):
    from library.lora_fuse import FusedLoras
    from library.lora_merge import load_loras
    from networks import lycoris

    lora = trained("sd", "lokr")
    family = get_family("sd")
    components = sd_components(models["sd"])
    network = lycoris.create_network(family.lora_targets(components), network_dim=4, network_alpha=2,
                                     network_args={"algo": "lokr", "factor": "4", "dora_wd": "True"})
    network.load_weights(lora)
    expected = {}
    for module in network.modules_by_name.values():
        layer = module.members[0]
        expected[id(layer)] = (layer, layer.weight.detach() + module.delta_weight())
    FusedLoras(family, components, load_loras([lora], [0.5], family), models["sd"], keep_originals=True) \
        .set_strength(2.0)  # ratio 0.5 at strength 2: the file as trained
    for layer, weight in expected.values():
        torch.testing.assert_close(layer.weight.detach(), weight, rtol=1e-5, atol=1e-5)


def test_convert_keeps_variants_in_kohya_and_comfy_and_refuses_diffusers(trained, tmp_path, capsys):
    from tools.convert_lora import convert_lora
    from tools.show_metadata import show_metadata

    lora = trained("sd", "loha")
    comfy, back = str(tmp_path / "comfy.safetensors"), str(tmp_path / "back.safetensors")
    convert_lora([lora, comfy, "--to", "comfy"])
    assert any(key.startswith("diffusion_model.") and key.endswith(".hada_w1_a") for key in load_file(comfy))
    convert_lora([comfy, back, "--to", "kohya", "--family", "sd"])
    original, round_trip = load_file(lora), load_file(back)
    assert original.keys() == round_trip.keys()
    assert all(torch.equal(original[key], round_trip[key]) for key in original)
    with pytest.raises(UserError, match="diffusers/PEFT LoRA layout holds only plain LoRA pairs, not LoHa"):
        convert_lora([lora, str(tmp_path / "peft.safetensors"), "--to", "diffusers"])
    show_metadata([lora])
    shown = capsys.readouterr().out
    assert "ss_network_module: lycoris.kohya" in shown
    assert "LoHa" in shown and "Stable Diffusion 1.x" in shown


def test_merges_a_variant_cannot_make_are_refused(trained, models, tmp_path):
    from tools.merge_lora import merge_lora

    with pytest.raises(UserError, match="merging into one LoRA takes plain LoRA pairs; .* is a LoHa module"):
        merge_lora(["--loras", trained("sd", "loha"), "--save_to", str(tmp_path / "one.safetensors"), "--concat"])
    with pytest.raises(UserError, match="DoRA module lora_unet_.* rescales a weight that this model stores in separate"):
        merge_lora(["--family", "flux", "--model", models["flux"], "--loras", trained("flux", "dora"),
                    "--save_to", str(tmp_path / "folder")])
    assert not (tmp_path / "folder").exists()


def test_resume_from_state_continues_exactly(models, tmp_path):
    """LoKr + DoRA with module dropout on FLUX (fused qkv): stop at the step-2 state, resume, and end with
    the file of the run never stopped, bit for bit (CPU)."""
    common = ["--pretrained_model_name_or_path", models["flux"], "--train_data_dir", models["images"],
              "--resolution", "64", "--output_name", "out", "--seed", "7", "--train_batch_size", "2",
              "--learning_rate", "1e-2", "--max_train_steps", "4", "--network_dim", "4", "--network_alpha", "2",
              "--save_every_n_steps", "2", "--save_state", *FAMILY_FLAGS["flux"], "--network_module", "lycoris.kohya",
              "--network_args", "algo=lokr", "dora_wd=True", "module_dropout=0.3"]
    run_training("flux", "network", [*common, "--output_dir", str(tmp_path / "full")])
    state = tmp_path / "full" / "out-step00000002-state"
    run_training("flux", "network", [*common, "--output_dir", str(tmp_path / "resumed"), "--resume", str(state)])
    uninterrupted = load_file(tmp_path / "full" / "out.safetensors")
    resumed = load_file(tmp_path / "resumed" / "out.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[key], resumed[key]) for key in uninterrupted)
    step2 = load_file(tmp_path / "full" / "out-step00000002.safetensors")
    assert any(not torch.equal(step2[key], uninterrupted[key]) for key in step2)
