"""Validation loss: the held-out split, fixed timesteps (DDPM and flow matching), determinism, and a real run."""

import os
import re
from argparse import Namespace
from contextlib import nullcontext

import pytest
import torch

from library.config.dataset_config import load_dataset_group
from library.errors import UserError
from library.training.validation import Validator, build_datasets, fixed_timesteps


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, like the subprocesses: the tiny models gain nothing from more, a busy 2-core
    machine runs them many times slower with 2, and resume exactness compares runs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(folder, count, prefix="img"):
    from library.demo import draw_shape

    folder.mkdir(parents=True)
    for index in range(count):
        draw_shape((10 * index, 50, 90), "circle", size=32).save(folder / f"{prefix}{index}.png")
        (folder / f"{prefix}{index}.caption").write_text(f"caption {index}")
    return folder


def spec_from(tmp_path, text):
    path = tmp_path / "ds.toml"
    path.write_text(text)
    return load_dataset_group(Namespace(dataset_config=str(path)))


def test_validation_split_is_deterministic_and_keeps_regularisation_images(tmp_path):
    train_dir, reg_dir = write_images(tmp_path / "train", 10), write_images(tmp_path / "reg", 2, "reg")
    text = (f"[general]\nresolution = 32\nvalidation_split = 0.3\nvalidation_seed = {{seed}}\n[[datasets]]\n"
            f"  [[datasets.subsets]]\n  image_dir = '{train_dir}'\n"
            f"  [[datasets.subsets]]\n  image_dir = '{reg_dir}'\n  is_reg = true\n")

    def split(seed):
        train, validation = build_datasets(spec_from(tmp_path, text.format(seed=seed)), 1, 1.0, None)
        return {e.image_path for e in train.entries}, {e.image_path for e in validation.entries}

    train, validation = split(5)
    assert len(validation) == 3 and len(train) == 7 + 2  # ceil(10 * 0.7) = 7 training images, plus the 2 reg images
    assert validation.isdisjoint(train) and all("/train/" in path for path in validation)
    assert split(5) == (train, validation)
    assert split(6)[1] != validation


def test_a_dataset_marked_is_validation_is_held_out_whole(tmp_path):
    first, second = write_images(tmp_path / "a", 3), write_images(tmp_path / "b", 2)
    spec = spec_from(tmp_path, f"[general]\nresolution = 32\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{first}'\n"
                               f"[[datasets]]\nis_validation = true\n  [[datasets.subsets]]\n  image_dir = '{second}'\n")
    train, validation = build_datasets(spec, 1, 1.0, None)
    assert sorted(os.path.basename(e.image_path) for e in validation.entries) == ["img0.png", "img1.png"]
    assert all("/a/" in e.image_path for e in train.entries) and len(train.entries) == 3
    assert build_datasets(spec_from(tmp_path, f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{first}'\n"),
                          1, 1.0, None)[1] is None


def test_validation_split_one_makes_the_whole_dataset_validation_data(tmp_path):
    """sd-scripts' validation_split = 1.0 (its FLUX guide): the dataset only scores, another one trains."""
    first, second = write_images(tmp_path / "a", 3), write_images(tmp_path / "b", 4)
    spec = spec_from(tmp_path, f"[general]\nresolution = 32\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{first}'\n"
                               f"[[datasets]]\nvalidation_split = 1.0\n  [[datasets.subsets]]\n  image_dir = '{second}'\n")
    train, validation = build_datasets(spec, 1, 1.0, None)
    assert sorted(os.path.basename(e.image_path) for e in validation.entries) == [f"img{i}.png" for i in range(4)]
    assert all("/a/" in e.image_path for e in train.entries) and len(train.entries) == 3
    alone = spec_from(tmp_path, f"[general]\nvalidation_split = 1.0\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{first}'\n")
    with pytest.raises(UserError, match="every training image of .* is validation data"):
        build_datasets(alone, 1, 1.0, None)


def test_validation_split_flag_range_points_to_is_validation():
    from library.training.validation import validate_validation_args

    args = Namespace(validate_every_n_steps=None, validate_every_n_epochs=None, max_validation_steps=None,
                     validation_split=1.5)
    with pytest.raises(UserError, match=r"--validation_split must be from 0 to 1 \(got 1.5\).*is_validation = true"):
        validate_validation_args(args)
    validate_validation_args(Namespace(**{**vars(args), "validation_split": 1.0}))


@pytest.mark.parametrize("text, message", [
    ("[general]\nvalidation_split = 1.5\n", "general.validation_split: expected a number from 0 to 1 (1 = the whole "
                                            "dataset is validation data, which is_validation = true in its [[datasets]] "
                                            "also says), got 1.5"),
    ("[general]\nis_validation = true\n", "general.is_validation: `is_validation` cannot be set here; it belongs in [[datasets]]"),
])
def test_validation_options_are_checked(tmp_path, text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        spec_from(tmp_path, text + "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '.'\n")


def test_fixed_timesteps_ddpm_and_flow_matching():
    from library.models.sd_checkpoint import sd_noise_scheduler
    from library.training.flow_matching import FlowMatchingNoiseScheme, FlowMatchingOptions
    from library.training.noise import DDPMNoiseOptions, DDPMNoiseScheme

    scheduler = sd_noise_scheduler(False)
    assert fixed_timesteps(DDPMNoiseScheme(scheduler), 4, "cpu").tolist() == [200, 400, 600, 800]  # as sd-scripts
    narrow = DDPMNoiseScheme(scheduler, DDPMNoiseOptions(min_timestep=100, max_timestep=500))
    assert fixed_timesteps(narrow, 4, "cpu").tolist() == [180, 260, 340, 420]
    assert fixed_timesteps(FlowMatchingNoiseScheme(), 4, "cpu").tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    ranged = FlowMatchingNoiseScheme(FlowMatchingOptions(min_timestep=100, max_timestep=600))
    assert fixed_timesteps(ranged, 4, "cpu").tolist() == pytest.approx([0.2, 0.3, 0.4, 0.5])


# ---- scoring with a flow-matching family stand-in ---------------------------------------------

class FlowFamily:
    """A family whose denoiser is one learnable scale and which records the timesteps it is called with."""

    def __init__(self):
        self.seen = []

    def tokenize_strategy(self, args, components):
        return None

    def text_encoding_strategy(self, args):
        return None

    def noise_scheme(self, args, components):
        from library.training.flow_matching import FlowMatchingNoiseScheme

        return FlowMatchingNoiseScheme(model_timestep_scale=1000.0)

    def predict(self, components, noisy, timesteps, conditioning, batch):
        self.seen.append(timesteps.tolist())
        return noisy * components.denoiser.weight


class LatentDataset:
    def batches_for_epoch(self, epoch):
        return [[0, 1], [2]]

    def make_batch(self, refs, epoch, global_step):
        latents = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(r)) for r in refs])
        return {"latents": latents, "sample_keys": [f"s{r}" for r in refs], "loss_weights": torch.ones(len(refs)),
                "conditioning": {"hidden": torch.zeros(len(refs), 1)}}


class OneProcess:
    device, process_index, num_processes = torch.device("cpu"), 0, 1

    def __init__(self):
        self.logged = []

    def autocast(self):
        return nullcontext()

    def log(self, values, step):
        self.logged.append((step, values))


def test_flow_matching_validation_uses_the_fixed_sigmas_and_is_reproducible():
    from library.training.step_loss import StepLoss

    family, accelerator = FlowFamily(), OneProcess()
    scale = torch.nn.Linear(1, 1)
    torch.nn.init.constant_(scale.weight, 0.5)
    components = Namespace(denoiser=scale)
    args = Namespace(loss_type="l2", validation_seed=None, max_validation_steps=None, validate_every_n_steps=3,
                     validate_every_n_epochs=None)
    step_loss = StepLoss(family, components, args, accelerator, None, torch.float32, trains_text_encoder=False)
    validator = Validator(LatentDataset(), step_loss, accelerator, args, seed=4, trainable_modules=[scale],
                          max_train_steps=10)
    first = validator.loss()
    assert family.seen == [[200.0, 200.0], [400.0, 400.0], [600.0, 600.0], [800.0, 800.0],
                           [200.0], [400.0], [600.0], [800.0]]
    torch.manual_seed(123)  # the training RNG does not move the validation noise
    assert validator.loss() == first
    torch.nn.init.constant_(scale.weight, 0.25)
    assert validator.loss() != first
    assert validator.run(3) == validator.loss() and accelerator.logged[-1][0] == 3
    assert (validator.due_at_step(3), validator.due_at_step(4), validator.due_at_epoch(1, 3), validator.due_at_epoch(1, 4)) \
        == (True, False, False, True)
    args.max_validation_steps = 1
    family.seen = []
    Validator(LatentDataset(), step_loss, accelerator, args, 4, [scale], 10).loss()
    assert len(family.seen) == 4


# ---- a real run -----------------------------------------------------------------------------

def test_training_logs_reproducible_validation_loss(tiny_sd15_folder, demo_image_root, tmp_path):
    from safetensors import safe_open
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from library.config.arguments import parse_training_args
    from library.families import get_family
    from library.training.trainer import Trainer

    family, args = parse_training_args(get_family("sd"), "network", [
        "--pretrained_model_name_or_path", tiny_sd15_folder, "--train_data_dir", demo_image_root, "--resolution", "64",
        "--output_dir", str(tmp_path / "out"), "--output_name", "out", "--seed", "3", "--train_batch_size", "2",
        "--learning_rate", "1e-3", "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "3",
        "--validation_split", "0.34", "--validate_every_n_steps", "2", "--logging_dir", str(tmp_path / "logs"),
    ])
    trainer = Trainer(family, args)
    trainer.train()
    with safe_open(str(tmp_path / "out" / "out.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "4"  # 2 of the 6 images held out
    logged = EventAccumulator(str(tmp_path / "logs" / "train")).Reload().Scalars("val/loss")
    # step 2 (every 2 steps; also the end of epoch 1, scored once) and step 3 (end of training in epoch 2)
    assert [event.step for event in logged] == [2, 3]
    validator = trainer.run.validator
    final = validator.loss()
    assert validator.loss() == final and final == pytest.approx(logged[-1].value, rel=1e-6)
    with torch.no_grad():
        next(iter(trainer.run.mode.network.modules_by_name.values())).lora_up.weight.add_(0.5)
    assert validator.loss() != final
