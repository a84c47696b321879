"""tools/merge_lora.py on a tiny SD 1.5: merged weights against the formula and against diffusers' own
fuse_lora, untouched tensors, dtypes, diffusers folders, LoRA+LoRA merges, and every bad input."""

import errno
import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_script
from library.errors import UserError
from library.lora_merge import lora_delta
from library.lora_formats import read_lora
from lora_checks import expected_delta, sd15_layers_by_kohya_name
from library.tools_common import run_tool
from tools.merge_lora import merge_lora
from tools_fixtures import write_random_lora

RATIOS = (0.8, 0.5)


@pytest.fixture(scope="module")
def files(tiny_sd15_folder, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from library.models.sd_checkpoint import save_sd15_single_file

    folder = tmp_path_factory.mktemp("merge")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, local_files_only=True)
    return {
        "folder": tiny_sd15_folder,
        "single": save_sd15_single_file(pipe, str(folder / "tiny.safetensors")),
        "a": write_random_lora(pipe, folder / "a.safetensors", seed=1, dim=4, alpha=2, conv_dim=2),
        "b": write_random_lora(pipe, folder / "b.safetensors", seed=2, dim=3, alpha=3, unet_only=True),
    }


@pytest.fixture(scope="module")
def merged_single(files, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out") / "merged.safetensors")
    merge_lora(["--model", files["single"], "--loras", files["a"], files["b"],
                "--ratios", *map(str, RATIOS), "--save_to", out])
    return out


@pytest.fixture(scope="module")
def merged_models(merged_single):
    """The merged single file loaded back with our single-file loader."""
    from library.models.sd_checkpoint import load_sd_single_file

    return load_sd_single_file(merged_single, load_vae=False)


def load_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_merged_single_file_equals_formula_for_every_module(files, merged_models):
    """Loaded with our single-file loader: W + sum(ratio * alpha / rank * up @ down), convs included."""
    base, merged = load_pipeline(files["folder"]), merged_models
    layers = sd15_layers_by_kohya_name(base)
    roots = {"unet": (base.unet, merged.unet), "text_encoder": (base.text_encoder, merged.text_encoder)}
    loras = [(ratio, load_file(files[key])) for ratio, key in zip(RATIOS, "ab")]
    names = {key.split(".")[0] for _, tensors in loras for key in tensors}
    assert any("resnets_0_conv1" in name for name in names) and any(n.startswith("lora_te_") for n in names)
    for name in names:
        root, path = layers[name]
        expected = roots[root][0].get_submodule(path).weight.detach().clone()
        for ratio, tensors in loras:
            if f"{name}.alpha" in tensors:
                down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
                expected += expected_delta(down, up, ratio * tensors[f"{name}.alpha"].item() / down.shape[0])
        torch.testing.assert_close(roots[root][1].get_submodule(path).weight, expected, atol=1e-5, rtol=0)


def test_merge_equals_diffusers_fuse_lora(files, merged_models):
    """diffusers' load_lora_weights + set_adapters + fuse_lora on the same base gives the same UNet/TE."""
    pipe = load_pipeline(files["folder"])
    pipe.load_lora_weights(files["a"], adapter_name="a")
    pipe.load_lora_weights(files["b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=list(RATIOS))
    pipe.fuse_lora(adapter_names=["a", "b"])
    pipe.unload_lora_weights()
    merged = merged_models
    for ours, theirs in ((merged.unet, pipe.unet), (merged.text_encoder, pipe.text_encoder)):
        reference = theirs.state_dict()
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, reference[key], atol=1e-5, rtol=0)


def test_untouched_tensors_bit_identical_and_metadata(files, merged_single):
    before, after = load_file(files["single"]), load_file(merged_single)
    assert before.keys() == after.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    modules = {key.split(".")[0] for key in load_file(files["a"])}  # b's modules are a subset of a's
    assert len(changed) == len(modules) == 289
    assert all(after[key].dtype == before[key].dtype for key in before)
    with safe_open(merged_single, "pt") as f:
        assert '"ratio": 0.8' in f.metadata()["merged_loras"]


def test_save_precision_sets_float_dtypes(files, merged_single, tmp_path):
    out = str(tmp_path / "merged_bf16.safetensors")
    merge_lora(["--model", files["single"], "--loras", files["a"], files["b"], "--ratios", *map(str, RATIOS),
                "--save_to", out, "--save_precision", "bf16"])
    reference, result = load_file(merged_single), load_file(out)
    for key, tensor in result.items():
        wanted = torch.bfloat16 if reference[key].is_floating_point() else reference[key].dtype
        assert tensor.dtype == wanted, key
        assert torch.equal(tensor, reference[key].to(wanted)), key


def test_diffusers_folder_merge_matches_single_file_merge(files, merged_models, tmp_path):
    out = tmp_path / "merged_folder"
    merge_lora(["--model", files["folder"], "--loras", files["a"], files["b"], "--ratios", *map(str, RATIOS),
                "--save_to", str(out)])
    assert sorted(os.listdir(out)) == sorted(os.listdir(files["folder"]))
    folder, single = load_pipeline(str(out)), merged_models
    for ours, theirs in ((folder.unet, single.unet), (folder.text_encoder, single.text_encoder)):
        reference = theirs.state_dict()
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=0)
    assert torch.equal(load_file(out / "vae" / "diffusion_pytorch_model.safetensors")["decoder.conv_in.weight"],
                       load_file(os.path.join(files["folder"], "vae", "diffusion_pytorch_model.safetensors"))[
                           "decoder.conv_in.weight"])


def lora_sum(loras_and_ratios, name):
    return sum(r * l.modules[name].scale * lora_delta(l.modules[name], "cpu")
               for l, r in loras_and_ratios if name in l.modules)


def test_concat_and_svd_lora_merges(files, tmp_path):
    """concat is exact; SVD to the summed rank (7 = 4 + 3; convs 2) reproduces the sum to rounding."""
    concat, svd = str(tmp_path / "concat.safetensors"), str(tmp_path / "svd.safetensors")
    common = ["--loras", files["a"], files["b"], "--ratios", *map(str, RATIOS)]
    merge_lora([*common, "--save_to", concat, "--concat"])
    merge_lora([*common, "--save_to", svd, "--new_rank", "7", "--new_conv_rank", "2"])
    a, b = read_lora(files["a"]), read_lora(files["b"])
    results = {path: read_lora(path) for path in (concat, svd)}
    linear, conv = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1"
    assert [results[svd].modules[n].rank for n in (linear, conv)] == [7, 2]
    assert results[concat].modules[linear].rank == 7 and results[concat].modules[linear].alpha.item() == 7
    with safe_open(concat, "pt") as f:
        assert f.metadata()["ss_merge_method"] == "concat" and f.metadata()["ss_network_dim"] == "Dynamic"
    for module in a.modules:
        wanted = lora_sum([(a, RATIOS[0]), (b, RATIOS[1])], module)
        for path, tolerance in ((concat, 1e-6), (svd, 1e-4)):
            got = results[path].modules[module]
            torch.testing.assert_close(got.scale * lora_delta(got, "cpu"), wanted, atol=tolerance, rtol=0)


def test_concat_merge_into_checkpoint_equals_merging_both(files, merged_single, tmp_path):
    concat, out = str(tmp_path / "concat.safetensors"), str(tmp_path / "m.safetensors")
    merge_lora(["--loras", files["a"], files["b"], "--ratios", *map(str, RATIOS), "--save_to", concat, "--concat"])
    merge_lora(["--model", files["single"], "--loras", concat, "--save_to", out])
    reference = load_file(merged_single)
    for key, tensor in load_file(out).items():
        torch.testing.assert_close(tensor, reference[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("argv_tail, message", [
    (["--ratios", "1", "2", "3"], "--ratios has 3 values for 2 --loras"),
    (["--save_to", "{a}"], "is also an input"),
    (["--new_rank", "4"], "only apply when merging LoRAs into one"),
])
def test_bad_arguments(files, tmp_path, argv_tail, message):
    argv = ["--model", files["single"], "--loras", files["a"], files["b"], "--save_to", str(tmp_path / "x.safetensors")]
    argv += [part.format(a=files["a"]) for part in argv_tail]
    with pytest.raises(UserError, match=message):
        merge_lora(argv)


def test_missing_file_and_wrong_family_lora(files, tmp_path):
    from library.lora_formats import write_lora

    with pytest.raises(UserError, match="nothing.safetensors: no such file"):
        merge_lora(["--model", str(tmp_path / "nothing.safetensors"), "--loras", files["a"], "--save_to", "o.st"])
    sdxl_lora = str(tmp_path / "sdxl.safetensors")
    tensors = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 64),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(64, 2),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0)}
    write_lora(sdxl_lora, tensors, {}, "kohya")
    with pytest.raises(UserError, match=r"only 0 of 1 LoRA modules match.*looks like a SDXL LoRA in kohya layout"):
        merge_lora(["--model", files["single"], "--loras", sdxl_lora, "--save_to", str(tmp_path / "o.safetensors")])


def test_full_disk_removes_partial_output_and_keeps_input(files, tmp_path, monkeypatch):
    from library.safetensors_stream import SafetensorsStreamWriter

    written = []

    def fill_up(self, data):
        written.append(len(data))
        if len(written) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    before = sha256(files["single"])
    monkeypatch.setattr(SafetensorsStreamWriter, "write_bytes", fill_up)
    out = tmp_path / "out" / "merged.safetensors"
    with pytest.raises(UserError, match="the disk is full"):
        merge_lora(["--model", files["single"], "--loras", files["a"], "--save_to", str(out)])
    assert os.listdir(out.parent) == [] and sha256(files["single"]) == before
    with pytest.raises(UserError, match="the disk is full; nothing was replaced"):
        merge_lora(["--model", files["folder"], "--loras", files["a"], "--save_to", str(tmp_path / "folder_out")])
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_command_line(files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    result = run_script("tools/merge_lora.py", "--model", files["single"], "--loras", files["a"],
                        "--save_to", str(out), "--save_precision", "fp16")
    assert result.returncode == 0, result.stderr
    assert all(t.dtype in (torch.float16, torch.int64) for t in load_file(out).values())
    with pytest.raises(SystemExit) as exit_info:  # what the script's __main__ runs, in-process
        run_tool(merge_lora, ["--model", files["single"], "--loras", files["a"], "--ratios", "1", "2",
                              "--save_to", str(out)])
    assert exit_info.value.code == 2
    assert "error: --ratios has 2 values for 1 --loras; give one ratio per LoRA" in capsys.readouterr().err
