"""End to end: flux_train.py (FLUX.1 full fine-tuning) on a tiny FLUX.1, and the memory features of full
fine-tuning (library/training/fused_backward.py, library/offload.py with trained weights).

Runs are in-process (`run_training`, the entry script's code path) on CPU with float32 weights, so runs
that should train the same weights are compared bit for bit or to float tolerance: the optimizer step
fused into backward (Adafactor, per parameter; any optimizer, per block) against the plain step after
backward, trained blocks swapped (through the host test backend) against no swap, and a resumed run against one never stopped. The saved BFL
file is read back with diffusers' own FLUX single-file loader.
"""

import pytest
import torch
from safetensors.torch import load_file

from library.cli import run_training

LAYERS = {"num_layers": 4, "num_single_layers": 6}  # room to swap: 2 blocks keep one double and two single out


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from library.tiny_models.flux import save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(str(tmp_path_factory.mktemp("tiny_flux") / "folder"), **LAYERS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from library.demo import write_demo_images

    return write_demo_images(str(tmp_path_factory.mktemp("images")), repeats=1)


def train(model, images, output_dir, *extra, steps="3"):
    """A flux_train.py run from `model` (a diffusers folder, or a list: transformer file and its flags)."""
    run_training("flux", "full", [
        "--pretrained_model_name_or_path", *([model] if isinstance(model, str) else model), "--train_data_dir", images, "--resolution", "64",
        "--output_dir", str(output_dir), "--output_name", "out", "--seed", "7", "--train_batch_size", "2",
        "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
        "--learning_rate", "1e-3", "--max_grad_norm", "0", "--cache_latents_to_disk", "--max_train_steps", steps,
        "--t5xxl_max_token_length", "16", *extra,
    ])
    return output_dir / "out.safetensors"


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def plain_run(tiny_flux, images, tmp_path_factory):
    """The reference: Adafactor stepped after backward, gradient checkpointing on."""
    return load_file(train(tiny_flux, images, tmp_path_factory.mktemp("plain"), "--gradient_checkpointing"))


@pytest.mark.parametrize("flag", ["--fused_backward_pass", "--blockwise_fused_optimizers"])
def test_fused_step_equals_the_plain_step(tiny_flux, images, tmp_path, plain_run, flag, monkeypatch):
    """Also through --cpu_offload_checkpointing (on a CPU run its moves are no-ops; the checkpoint path is used).
    The fused hooks and the offloading checkpoint must really run: an ignored flag would match the plain run too."""
    from library.training import fused_backward

    calls = {"step_only": 0, "offloading_checkpoint": 0}

    def counted(name):
        original = getattr(fused_backward, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(fused_backward, name, wrapper)

    counted("step_only")
    counted("offloading_checkpoint")
    fused = load_file(train(tiny_flux, images, tmp_path, flag, "--gradient_checkpointing", "--cpu_offload_checkpointing"))
    assert_same(fused, plain_run, atol=1e-6)
    assert calls["step_only"] > 0 and calls["offloading_checkpoint"] > 0


def test_swapped_trained_blocks_equal_no_swap(tiny_flux, images, tmp_path, plain_run, monkeypatch):
    """--blocks_to_swap 2 (1 double + 2 single blocks in CPU memory) through the host test backend (every move a
    real copy between separate tensors), plain step (swapped blocks step in CPU memory) and fused step
    (they step while on the device): the same weights as without swapping, to float rounding (a kernel's
    result may differ in its last bit between buffers at different addresses)."""
    import library.offload as offload

    backends = []

    def backend(device):
        backends.append(offload.HostTransferBackend())
        return backends[-1]

    monkeypatch.setattr(offload, "require_cuda", lambda device: None)
    monkeypatch.setattr(offload, "CudaTransferBackend", backend)
    swapped = load_file(train(tiny_flux, images, tmp_path / "plain", "--gradient_checkpointing", "--blocks_to_swap", "2"))
    assert_same(swapped, plain_run, atol=1e-6)
    fused = load_file(train(tiny_flux, images, tmp_path / "fused", "--gradient_checkpointing", "--blocks_to_swap", "2",
                            "--fused_backward_pass"))
    assert_same(fused, plain_run, atol=1e-6)
    assert len(backends) == 2


def test_bfl_file_reloads_in_diffusers_and_diffusers_folder_holds_the_same(tiny_flux, images, tmp_path, plain_run,
                                                                          monkeypatch):
    """diffusers' FluxTransformer2DModel.from_single_file reads the BFL file we wrote; its weights are the ones
    the run trained (the same run saved as a diffusers folder), and they moved away from the base model."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils

    train(tiny_flux, images, tmp_path, "--gradient_checkpointing", "--save_model_as", "diffusers")
    folder_model = FluxTransformer2DModel.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    single_path = str(tmp_path / "single.safetensors")
    from safetensors.torch import save_file

    save_file(plain_run, single_path)
    # diffusers' converter splits single blocks' linear1 with FLUX.1's real widths (3 x 3072 + 12288); the
    # shim only scales those four sizes to this model's width, everything else is diffusers' own mapping
    monkeypatch.setattr(single_file_utils, "torch", _ScaledSplitTorch(base.inner_dim))
    loaded = FluxTransformer2DModel.from_single_file(single_path, config=tiny_flux, subfolder="transformer",
                                                     local_files_only=True)
    monkeypatch.undo()
    reloaded, trained, original = loaded.state_dict(), folder_model.state_dict(), base.state_dict()
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)
    changed = [k for k in trained if not torch.equal(trained[k], original[k])]
    assert len(changed) > 0.9 * len(trained)


class _ScaledSplitTorch:
    """torch, except that split sizes written for a 3072-wide FLUX are scaled to `width`."""

    def __init__(self, width: int):
        self.width = width

    def __getattr__(self, name):
        return getattr(torch, name)

    def split(self, tensor, sizes, dim=0):
        if isinstance(sizes, tuple) and sum(sizes) != tensor.shape[dim]:
            sizes = tuple(s * self.width // 3072 for s in sizes)
        return torch.split(tensor, sizes, dim)


def test_resume_from_bfl_files_is_exact(images, tmp_path):
    """From BFL single files (their fused q/k/v become separate parameters that a fused step updates one by one),
    blockwise fused steps, state saved at step 2 and resumed: the same final weights as a run never stopped."""
    from library.tiny_models.flux import save_tiny_flux_single_files

    files = save_tiny_flux_single_files(str(tmp_path / "files"))
    model = [files["transformer"], "--clip_l", files["clip_l"], "--t5xxl", files["t5xxl"], "--ae", files["ae"],
             "--t5_tokenizer", files["t5_tokenizer"]]
    common = ["--gradient_checkpointing", "--blockwise_fused_optimizers", "--save_every_n_steps", "2", "--save_state"]
    full = load_file(train(model, images, tmp_path / "full", *common, steps="4"))
    state = tmp_path / "full" / "out-step00000002-state"
    resumed = load_file(train(model, images, tmp_path / "resumed", *common, "--resume", str(state), steps="4"))
    assert_same(resumed, full)
    step2 = load_file(tmp_path / "full" / "out-step00000002.safetensors")
    assert any(not torch.equal(step2[k], full[k]) for k in full)


def test_user_errors(tiny_flux, images, tmp_path, capsys):
    cases = [
        (["--fused_backward_pass", "--optimizer_type", "AdamW"], "--fused_backward_pass steps Adafactor only"),
        (["--fused_backward_pass", "--gradient_accumulation_steps", "2"], "cannot accumulate gradients"),
        (["--blockwise_fused_optimizers", "--mixed_precision", "fp16"], "use --mixed_precision bf16"),
        (["--fused_backward_pass", "--blockwise_fused_optimizers"], "choose one"),
        (["--cpu_offload_checkpointing", "--blocks_to_swap", "2"], "cannot be combined with --blocks_to_swap"),
        (["--train_text_encoder"], "FLUX.1 full fine-tuning trains the transformer only"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_training("flux", "full", ["--pretrained_model_name_or_path", tiny_flux, "--train_data_dir", images,
                                          "--output_dir", str(tmp_path), "--optimizer_type", "Adafactor", *flags])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
