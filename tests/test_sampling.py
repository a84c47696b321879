"""Sample images during training: prompt files, schedulers, the Sampler, and a real run on tiny SD 1.5."""

import importlib
import os
import re
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.families.sd import SDFamily
from library.training import sampling
from library.training.sampling import SamplePrompt, Sampler, load_sample_prompts, validate_sampling_args

TIMESTAMP = r"\d{14}"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, like the subprocesses: the tiny models gain nothing from more, a busy 2-core
    machine runs them many times slower with 2, and resume exactness compares runs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- prompt files -----------------------------------------------------------------------------

def test_txt_prompt_file_flags_comments_and_clamping(tmp_path):
    path = write(tmp_path / "p.txt", "# a comment\n\na cat --n blurry, ugly --w 512 --h 768 --d 42 --s 2000 --l 5.5"
                                     " --g 3.5 --ss K_EULER_A\n  [trigger] on a hill  \n")
    first, second = load_sample_prompts(path)
    assert first == SamplePrompt(prompt="a cat", negative_prompt="blurry, ugly", width=512, height=768, seed=42,
                                 sample_steps=1000, scale=5.5, guidance_scale=3.5, sample_sampler="euler_a", index=0)
    assert second == SamplePrompt(prompt="[trigger] on a hill", index=1)


@pytest.mark.parametrize("line, message", [
    ("a cat --x 3", "line 1: unknown prompt option --x"),
    ("a cat --w wide", "line 1: width must be a positive whole number, got 'wide'"),
    ("a cat --d -3", "line 1: seed must be a non-negative whole number, got '-3'"),
    ("a cat --ss eulerr", "line 1: unknown sampler 'eulerr' (did you mean `euler`?)"),
    (" --w 64", "line 1: the prompt text is empty"),
])
def test_bad_prompt_lines_name_the_line(tmp_path, line, message):
    path = write(tmp_path / "p.txt", line + "\n")
    with pytest.raises(UserError, match=re.escape(f"{path} {message}")):
        load_sample_prompts(path)


def test_toml_prompt_defaults_and_subsets(tmp_path):
    path = write(tmp_path / "p.toml", '[prompt]\nwidth = 64\nsample_steps = 3\nnegative_prompt = "bad"\n\n'
                                      '[[prompt.subset]]\nprompt = "a dog"\nseed = 1\n\n'
                                      '[[prompt.subset]]\nprompt = "a fox"\nwidth = 128\nscale = 2\n')
    assert load_sample_prompts(path) == [
        SamplePrompt("a dog", negative_prompt="bad", width=64, seed=1, sample_steps=3, index=0),
        SamplePrompt("a fox", negative_prompt="bad", width=128, sample_steps=3, scale=2.0, index=1),
    ]


def test_json_prompts_strings_and_objects(tmp_path):
    path = write(tmp_path / "p.json", '["a dog --d 7", {"prompt": "a fox", "height": 64, "sample_sampler": "ddim"}]')
    assert load_sample_prompts(path) == [SamplePrompt("a dog", seed=7, index=0),
                                         SamplePrompt("a fox", height=64, sample_sampler="ddim", index=1)]
    bad = write(tmp_path / "bad.json", '[{"prompt": "a fox", "heigth": 64}]')
    with pytest.raises(UserError, match=re.escape(f"{bad}: item 0: unknown prompt key `heigth` (did you mean `height`?)")):
        load_sample_prompts(bad)


@pytest.mark.parametrize("options, message", [
    (dict(sample_prompts="{prompts}"), "--sample_prompts {prompts}: say when to sample"),
    (dict(sample_every_n_steps=5), "need --sample_prompts FILE"),
    (dict(sample_prompts="{prompts}", sample_every_n_steps=5, sample_every_n_epochs=1), "pass one of them"),
    (dict(sample_prompts="missing.txt", sample_at_first=True), "--sample_prompts missing.txt: file not found"),
    (dict(sample_every_n_steps=0), "--sample_every_n_steps must be at least 1"),
])
def test_sampling_flag_errors(tmp_path, options, message):
    prompts = write(tmp_path / "p.txt", "a cat\n")
    given = {key: value.format(prompts=prompts) if isinstance(value, str) else value for key, value in options.items()}
    args = Namespace(**{**dict(sample_prompts=None, sample_every_n_steps=None, sample_every_n_epochs=None,
                               sample_at_first=False), **given})
    with pytest.raises(UserError, match=re.escape(message.format(prompts=prompts))):
        validate_sampling_args(args)


def test_sampler_names_map_to_diffusers_schedulers_with_the_training_betas():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    from library.models.sd_checkpoint import sd_noise_scheduler

    training = sd_noise_scheduler(False)
    euler_a = sampling.ddpm_sampling_scheduler(training, "k_euler_a")
    assert isinstance(euler_a, EulerAncestralDiscreteScheduler)
    assert torch.equal(euler_a.betas, training.betas)
    dpm = sampling.ddpm_sampling_scheduler(training, "dpmsolver++")
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "dpmsolver++"
    ddim = sampling.ddpm_sampling_scheduler(sd_noise_scheduler(True), "ddim")
    assert isinstance(ddim, DDIMScheduler) and ddim.config.prediction_type == "v_prediction"
    with pytest.raises(UserError, match="unknown sampler 'lcm'"):
        sampling.ddpm_sampling_scheduler(training, "lcm")


# ---- the Sampler with a recording pipeline ----------------------------------------------------------

class RecordingPipeline:
    """Stands in for a diffusers pipeline: records each call; the image colour comes from the generator."""

    calls: list = []

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def set_progress_bar_config(self, **_):
        pass

    def __call__(self, prompt, width, height, generator, num_inference_steps, **kwargs):
        value = int(torch.randint(0, 256, (1,), generator=generator))
        RecordingPipeline.calls.append(dict(prompt=prompt, width=width, height=height, steps=num_inference_steps,
                                            scheduler=type(self.scheduler).__name__, value=value, **kwargs))
        return Namespace(images=[Image.new("RGB", (width, height), (value, 0, 0))])


class RecordingFamily(SDFamily):
    def build_pipeline(self, components, scheduler=None):
        return RecordingPipeline(scheduler)


class FakeAccelerator:
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def autocast(self):
        from contextlib import nullcontext

        return nullcontext()


def test_sampler_replaces_trigger_honours_seeds_sizes_and_writes_sheet(tmp_path):
    from library.models.sd_checkpoint import sd_noise_scheduler

    prompts = write(tmp_path / "p.txt", "[trigger] cat --n no [trigger] --d 5 --w 100 --h 70 --s 3 --ss euler\n"
                                        "dog --l 2.5\n")
    args = Namespace(sample_prompts=prompts, output_dir=str(tmp_path / "out"), output_name="run", sample_sampler="ddim",
                     sample_at_first=True, sample_every_n_steps=2, sample_every_n_epochs=None, clip_skip=2)
    network = torch.nn.Linear(2, 2)
    sampler = Sampler(RecordingFamily(), args, Namespace(noise_scheduler=sd_noise_scheduler(False)), FakeAccelerator(),
                      [network], trigger_word="sks", seed=11)
    assert (sampler.due_at_first(0), sampler.due_at_step(2), sampler.due_at_step(3), sampler.due_at_epoch(1)) == \
        (True, True, False, False)
    RecordingPipeline.calls = []
    torch.manual_seed(0)
    paths = sampler.sample(4)
    state = torch.get_rng_state()
    again = sampler.sample(6)
    assert torch.equal(state, torch.get_rng_state())  # sampling leaves the global RNG alone
    first, second = RecordingPipeline.calls[:2]
    assert first == dict(prompt="sks cat", negative_prompt="no sks", width=64, height=64, steps=3,
                         scheduler="EulerDiscreteScheduler", guidance_scale=7.5, clip_skip=1, value=first["value"])
    assert second == dict(prompt="dog", width=512, height=512, steps=30, scheduler="DDIMScheduler",
                          guidance_scale=2.5, clip_skip=1, value=second["value"])
    assert [c["value"] for c in RecordingPipeline.calls[2:]] == [first["value"], second["value"]]  # same seeds
    names = [os.path.basename(p) for p in paths]
    assert re.fullmatch(rf"run_000004_00_{TIMESTAMP}_5\.png", names[0])
    assert re.fullmatch(rf"run_000004_01_{TIMESTAMP}\.png", names[1])
    assert names[2] == "run_000004_contact_sheet.png" and os.path.basename(again[2]) == "run_000006_contact_sheet.png"
    assert Image.open(paths[0]).size == (64, 64)
    sheet = Image.open(paths[2])
    assert sheet.size == (2 * 512, 512 + 14)
    assert sheet.getpixel((10, 10)) == (first["value"], 0, 0) and sheet.getpixel((600, 10)) == (second["value"], 0, 0)
    assert network.training  # train mode restored after sampling in eval mode


# ---- a real training run ------------------------------------------------------------------------

def test_training_samples_with_the_current_lora(tiny_sd15_folder, demo_image_root, tmp_path):
    from library.cli import run_training

    prompts = write(tmp_path / "prompts.txt", "# samples\n[trigger] shape --d 3 --w 64 --h 64 --s 2\n"
                                              "[trigger] shape --d 3 --w 64 --h 64 --s 2\n"
                                              "a wide one --d 9 --w 128 --h 64 --s 2 --ss euler_a\n")
    output = tmp_path / "out"
    run_training("sd", "network", [
        "--pretrained_model_name_or_path", tiny_sd15_folder, "--train_data_dir", demo_image_root, "--resolution", "64",
        "--output_dir", str(output), "--output_name", "lora", "--seed", "1", "--train_batch_size", "2",
        "--learning_rate", "3e-2", "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "2",
        "--sample_prompts", prompts, "--sample_at_first", "--sample_every_n_steps", "2", "--trigger_word", "sks",
    ])
    names = sorted(os.listdir(output / "sample"))
    assert len(names) == 8
    assert names[3] == "lora_000002_contact_sheet.png"
    assert names[7] == "lora_e000000_contact_sheet.png"
    for tag in ("000002", "e000000"):
        for index, seed in ((0, 3), (1, 3), (2, 9)):
            assert sum(bool(re.fullmatch(rf"lora_{tag}_{index:02d}_{TIMESTAMP}_{seed}\.png", n)) for n in names) == 1

    def pixels(tag, index):
        name = next(n for n in names if n.startswith(f"lora_{tag}_{index:02d}_"))
        return np.asarray(Image.open(output / "sample" / name))

    assert pixels("000002", 2).shape == (64, 128, 3) and pixels("e000000", 0).shape == (64, 64, 3)
    assert np.array_equal(pixels("e000000", 0), pixels("e000000", 1))  # same prompt and seed: same image
    assert np.array_equal(pixels("000002", 0), pixels("000002", 1))
    assert not np.array_equal(pixels("e000000", 0), pixels("000002", 0))  # the trained LoRA changed the sample


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Diffusers folders of the other landed families' tiny models, built on first use."""
    root, built = tmp_path_factory.mktemp("tiny_models"), {}

    def folder(family):
        if family not in built:
            module = importlib.import_module(f"library.tiny_models.{family}")
            built[family] = getattr(module, f"save_tiny_{family}_pipeline")(str(root / family))
        return built[family]

    return folder


@pytest.mark.parametrize("family, extra", [
    ("sdxl", []), ("flux", ["--t5xxl_max_token_length", "16"]), ("sd3", ["--t5xxl_max_token_length", "16"]),
    ("lumina", ["--gemma2_max_token_length", "48"]),
])
def test_other_families_sample_with_the_current_lora(tiny_models, demo_image_root, tmp_path, family, extra):
    from library.cli import run_training

    prompts = write(tmp_path / "prompts.txt", "shape --d 4 --w 64 --h 64 --s 1\nshape --d 4 --w 64 --h 64 --s 1\n"
                                              "wide --d 5 --w 128 --h 64 --s 1\n")
    output = tmp_path / "out"
    run_training(family, "network", [
        "--pretrained_model_name_or_path", tiny_models(family), "--train_data_dir", demo_image_root, "--resolution",
        "64", "--output_dir", str(output), "--output_name", "lora", "--seed", "1", "--train_batch_size", "2",
        "--learning_rate", "3e-2", "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "1",
        "--sample_prompts", prompts, "--sample_at_first", "--sample_every_n_steps", "1", *extra,
    ])
    folder = output / "sample"

    def pixels(tag, index):
        name = next(n for n in os.listdir(folder) if n.startswith(f"lora_{tag}_{index:02d}_"))
        return np.asarray(Image.open(folder / name))

    assert len(os.listdir(folder)) == 8
    assert pixels("e000000", 0).shape == (64, 64, 3) and pixels("000001", 2).shape == (64, 128, 3)
    assert np.array_equal(pixels("000001", 0), pixels("000001", 1))
    assert not np.array_equal(pixels("e000000", 0), pixels("000001", 0))
