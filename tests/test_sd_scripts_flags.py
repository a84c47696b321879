"""sd-scripts' flags (tests/data/sd_scripts_flags/*.txt) are each parsed by our script or refused with a reason.

Also: no flag is both parsed and in the refusal table (a stale entry after a feature lands), and a
command line or config file naming refused, accepted or unknown flags answers as documented.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pytest

from library.config.arguments import build_parser, parse_training_args
from library.config.sd_scripts_compat import ACCEPTED, REFUSED, applicable_accepted, applicable_refusals, \
    is_refused_action
from library.errors import UserError
from library.families import get_family

FLAG_LISTS = Path(__file__).parent / "data" / "sd_scripts_flags"
TRAINING_SCRIPTS = {
    "sd_train_network": ("sd", "network"), "sdxl_train_network": ("sdxl", "network"),
    "flux_train_network": ("flux", "network"), "sd3_train_network": ("sd3", "network"),
    "lumina_train_network": ("lumina", "network"), "sd_train": ("sd", "full"), "sdxl_train": ("sdxl", "full"),
    "sd3_train": ("sd3", "full"), "lumina_train": ("lumina", "full"), "flux_train": ("flux", "full"),
}


def read_flag_list(name: str) -> list[str]:
    lines = (FLAG_LISTS / f"{name}.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def parsed_names(parser: argparse.ArgumentParser) -> set[str]:
    """Flags the parser honours (or accepts as no-ops), not the hidden refused ones."""
    return {option.lstrip("-") for action in parser._actions if not is_refused_action(action)
            for option in action.option_strings}


def own_parser_names(family: str, mode: str) -> set[str]:
    """What the script parses before the compatibility flags are added."""
    parser = build_parser(get_family(family), mode)
    return {option.lstrip("-") for action in parser._actions if not is_refused_action(action)
            and not _is_accepted_action(action) for option in action.option_strings}


def _is_accepted_action(action) -> bool:
    return any(option.lstrip("-") in ACCEPTED for option in action.option_strings) and \
        action.container.title is not None and "sd-scripts compatibility" in action.container.title


def test_every_list_has_its_commit_header():
    for path in FLAG_LISTS.glob("*.txt"):
        assert "kohya-ss/sd-scripts" in path.read_text(encoding="utf-8").splitlines()[0]
        assert read_flag_list(path.stem), path


@pytest.mark.parametrize("script", sorted(TRAINING_SCRIPTS))
def test_every_sd_scripts_flag_is_parsed_or_refused(script):
    family, mode = TRAINING_SCRIPTS[script]
    parsed = parsed_names(build_parser(get_family(family), mode))
    refused = applicable_refusals(family, mode)
    missing = [name for name in read_flag_list(script) if name not in parsed and name not in refused]
    assert missing == [], f"{script}.py: sd-scripts flags neither parsed nor refused: {missing}"


@pytest.mark.parametrize("script", sorted(TRAINING_SCRIPTS))
def test_no_flag_is_both_parsed_and_refused(script):
    """Fails when a feature lands and its refusal entry (or its no-op entry) was not removed or narrowed."""
    family, mode = TRAINING_SCRIPTS[script]
    own = own_parser_names(family, mode)
    stale = sorted(set(applicable_refusals(family, mode)) & own)
    stale += sorted(set(applicable_accepted(family, mode)) & own)
    assert stale == [], f"{script}.py parses these flags, yet the compatibility table still lists them: {stale}"


def test_every_table_entry_applies_somewhere_and_explains_itself():
    for flag, entry in {**REFUSED, **ACCEPTED}.items():
        scripts = [s for s, (family, mode) in TRAINING_SCRIPTS.items() if entry.applies(family, mode)]
        assert scripts, flag
    for flag, entry in REFUSED.items():
        assert entry.reason and entry.instead, flag


def _parse(family, mode, argv):
    return parse_training_args(get_family(family), mode, argv)


def test_refused_and_unknown_flags_are_reported_together(tmp_path):
    argv = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path),
            "--huggingface_repo_id", "me/model", "--learnin_rate", "1e-4", "--deepspeed", "--frobnicate", "3"]
    with pytest.raises(UserError) as error:
        _parse("sd", "network", argv)
    lines = str(error.value).splitlines()
    assert lines[0] == "4 flags or keys cannot be used:"
    assert lines[1].strip() == ("--huggingface_repo_id: uploading to the Hugging Face Hub is not built in; upload "
                                "the output folder afterwards with `huggingface-cli upload`")
    assert lines[2].strip().startswith("--deepspeed: DeepSpeed is set up through accelerate, not through training flags;")
    assert lines[3].strip() == "--learnin_rate: no such flag in this script (did you mean `learning_rate`?)"
    assert lines[4].strip().startswith("--frobnicate: no such flag in this script")  # its value 3 is skipped


def test_config_file_reports_every_unknown_and_refused_key(tmp_path):
    config = tmp_path / "args.toml"
    config.write_text('[model]\npretrained_model_name_or_path = "m.safetensors"\noutput_dir = "out"\n'
                      '[extra]\nlearning_rat = 1e-4\nhuggingface_repo_id = "me/x"\nnetwork_dimm = 4\n',
                      encoding="utf-8")
    with pytest.raises(UserError) as error:
        _parse("sd", "network", ["--config_file", str(config)])
    message = str(error.value)
    assert message.startswith("3 flags or keys cannot be used:")
    assert f"{config}: unknown key `extra.learning_rat`: no flag --learning_rat in this script " \
           "(did you mean `learning_rate`?)" in message
    assert f"{config}: `extra.huggingface_repo_id`: uploading to the Hugging Face Hub is not built in; upload the " \
           "output folder afterwards with `huggingface-cli upload`\n" in message + "\n"
    assert "did you mean `network_dim`?" in message


def test_a_refused_flag_is_matched_exactly_not_as_an_abbreviation(tmp_path):
    """`--vae` on FLUX must be refused, not read as an abbreviation of --vae_batch_size."""
    with pytest.raises(UserError, match=r"^--vae: this family reads its autoencoder from --ae"):
        _parse("flux", "network", ["--pretrained_model_name_or_path", "f.safetensors", "--output_dir", str(tmp_path),
                                   "--vae", "ae.safetensors"])


def test_accepted_flags_parse_and_log_once(tmp_path, caplog):
    argv = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path), "--dataset_config",
            "d.toml", "--network_module", "networks.lora", "--sdpa", "--mem_eff_attn"]
    with caplog.at_level(logging.INFO, logger="library.config.sd_scripts_compat"):
        try:
            _parse("sd", "network", argv)
        except UserError:
            pass  # later checks (the model file) may fail; the flags were parsed and logged first
    logged = [r.getMessage() for r in caplog.records if r.name == "library.config.sd_scripts_compat"]
    assert logged == ["--sdpa: accepted for sd-scripts compatibility; " + ACCEPTED["sdpa"].note,
                      "--mem_eff_attn: accepted for sd-scripts compatibility; " + ACCEPTED["mem_eff_attn"].note]


def test_old_optimizer_switches_select_the_optimizer(tmp_path):
    base = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path)]
    from library.training.optimizers import apply_optimizer_switches

    args = argparse.Namespace(optimizer_type=None, use_8bit_adam=True, use_lion_optimizer=False)
    apply_optimizer_switches(args)
    assert args.optimizer_type == "AdamW8bit"
    args = argparse.Namespace(optimizer_type=None, use_8bit_adam=False, use_lion_optimizer=True)
    apply_optimizer_switches(args)
    assert args.optimizer_type == "Lion"
    with pytest.raises(UserError, match="--use_8bit_adam and --optimizer_type Prodigy exclude each other"):
        _parse("sd", "network", base + ["--use_8bit_adam", "--optimizer_type", "Prodigy"])


@pytest.mark.parametrize("value", ["ckpt", "pt"])
def test_lora_save_model_as_pickle_formats_are_refused(tmp_path, value):
    from networks.network_arguments import validate_network_args

    _, args = _parse("sdxl", "network", ["--pretrained_model_name_or_path", "m.safetensors",
                                         "--output_dir", str(tmp_path), "--save_model_as", value])
    with pytest.raises(UserError, match=f"--save_model_as {value}: LoRA files are written as safetensors only"):
        validate_network_args(args)


def test_flux_model_type_chroma_is_refused(tmp_path):
    with pytest.raises(UserError, match="--model_type chroma: Chroma models are not supported"):
        _parse("flux", "network", ["--pretrained_model_name_or_path", "f.safetensors", "--output_dir", str(tmp_path),
                                   "--model_type", "chroma"])


def test_help_hides_refused_flags_and_shows_accepted_ones():
    text = build_parser(get_family("sd"), "network").format_help()
    assert "--sdpa" in text and "--huggingface_repo_id" not in text


def test_text_encoder_lr_takes_one_value_per_text_encoder():
    """SDXL: --text_encoder_lr TE1 TE2 gives each encoder's LoRA modules its own group (sd-scripts' order)."""
    from library.families.base import LoraTarget
    from library.tiny_models.sdxl import tiny_sdxl_pipeline
    from networks.lora import create_network

    pipe = tiny_sdxl_pipeline()
    targets = [LoraTarget("lora_unet", pipe.unet, ("Transformer2DModel",)),
               LoraTarget("lora_te1", pipe.text_encoder, ("CLIPAttention", "CLIPMLP"), file_path_prefix="text_model.",
                          is_text_encoder=True),
               LoraTarget("lora_te2", pipe.text_encoder_2, ("CLIPAttention", "CLIPMLP"), is_text_encoder=True)]
    network = create_network(targets, network_dim=2, network_alpha=1.0)
    groups = network.prepare_optimizer_params(1e-4, [1e-5, 2e-5], 3e-4)
    by_name = {group["name"]: group for group in groups}
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("text_encoder1", 1e-5),
                                                       ("text_encoder2", 2e-5)]
    names = {id(p): name for name, m in network.modules_by_name.items() for p in m.parameters()}
    assert {names[id(p)].split("_")[1] for p in by_name["text_encoder1"]["params"]} == {"te1"}
    assert {names[id(p)].split("_")[1] for p in by_name["text_encoder2"]["params"]} == {"te2"}
    single = network.prepare_optimizer_params(None, [5e-6], 3e-4)  # one value: every text encoder
    assert [(g["name"], g["lr"]) for g in single] == [("unet", 3e-4), ("text_encoder", 5e-6)]
    frozen = network.prepare_optimizer_params(None, [0, 2e-5], 3e-4)  # 0 freezes TE1 only
    assert [(g["name"], g["lr"]) for g in frozen] == [("unet", 3e-4), ("text_encoder2", 2e-5)]
    with pytest.raises(UserError, match="--text_encoder_lr has 3 values but this LoRA covers 2 text encoder"):
        network.prepare_optimizer_params(None, [1e-5, 2e-5, 3e-5], 3e-4)


def test_text_encoder_lr_parses_several_values(tmp_path):
    _, args = _parse("sdxl", "network", ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir",
                                         str(tmp_path), "--text_encoder_lr", "1e-5", "2e-5"])
    assert args.text_encoder_lr == [1e-5, 2e-5]


@pytest.mark.parametrize("family", ["flux", "sd3", "lumina"])
def test_cached_text_outputs_train_the_denoiser_only_on_dit_families(tmp_path, caplog, family):
    argv = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path),
            "--cache_text_encoder_outputs"]
    with caplog.at_level(logging.INFO, logger="library.data.text_encoder_cache"):
        _, args = _parse(family, "network", argv)
    assert args.network_train_unet_only is True
    assert any("training the denoiser LoRA only" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="cached text-encoder outputs cannot train the text encoders"):
        _parse(family, "network", argv + ["--text_encoder_lr", "1e-5"])  # asked for explicitly: refused


def test_cached_text_outputs_with_text_encoder_training_stay_refused_on_sdxl(tmp_path):
    with pytest.raises(UserError, match="cached text-encoder outputs cannot train the text encoders"):
        _parse("sdxl", "network", ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path),
                                   "--cache_text_encoder_outputs"])


@pytest.mark.parametrize("script", ["merge_lora", "sdxl_merge_lora", "flux_merge_lora"])
def test_every_sd_scripts_merge_flag_is_parsed_or_refused(script):
    from library.config.sd_scripts_compat import MERGE_LORA_REFUSED
    from tools.merge_lora import build_parser as merge_parser

    parsed = parsed_names(merge_parser())
    missing = [name for name in read_flag_list(script) if name not in parsed and name not in MERGE_LORA_REFUSED]
    assert missing == [], f"networks/{script}.py flags neither parsed nor refused: {missing}"


def test_merge_tables_are_not_stale():
    from library.config.sd_scripts_compat import MERGE_LORA_ACCEPTED, MERGE_LORA_REFUSED
    from tools.merge_lora import build_parser as merge_parser

    own = {option.lstrip("-") for action in merge_parser()._actions if not is_refused_action(action)
           and action.container.title != "accepted for sd-scripts compatibility (no effect here)"
           for option in action.option_strings}
    assert sorted((set(MERGE_LORA_REFUSED) | set(MERGE_LORA_ACCEPTED)) & own) == []


def test_merge_lora_with_sd_scripts_names_writes_the_same_file(tmp_path):
    """`--models ... --ratios ... --save_to ... --precision float --working_device cpu` (sd-scripts' spelling)
    writes the same tensors as our spelling."""
    from safetensors.torch import load_file

    from library.tiny_models.sd import tiny_sd15_pipeline
    from tools.merge_lora import merge_lora
    from tools_fixtures import write_random_lora

    pipe = tiny_sd15_pipeline()
    a = write_random_lora(pipe, str(tmp_path / "a.safetensors"), seed=1, dim=2, alpha=1.0)
    b = write_random_lora(pipe, str(tmp_path / "b.safetensors"), seed=2, dim=2, alpha=2.0)
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    merge_lora(["--loras", a, b, "--ratios", "1", "0.5", "--save_to", ours, "--concat"])
    merge_lora(["--models", a, b, "--ratios", "1", "0.5", "--save_to", theirs, "--concat", "--precision", "float",
                "--working_device", "cpu"])
    mine, other = load_file(ours), load_file(theirs)
    assert mine.keys() == other.keys() and all(torch_equal(mine[k], other[k]) for k in mine)


def torch_equal(x, y) -> bool:
    import torch

    return x.dtype == y.dtype and torch.equal(x, y)


def test_merge_lora_names_every_missing_argument_and_refuses_shuffle():
    from tools.merge_lora import merge_lora

    with pytest.raises(UserError, match=r"^missing --loras \(or --models\) and --save_to"):
        merge_lora(["--sd_model", "model.safetensors"])
    with pytest.raises(UserError, match="--shuffle: shuffling the rank order"):
        merge_lora(["--models", "a.safetensors", "--save_to", "o.safetensors", "--shuffle"])
    with pytest.raises(UserError, match="--clip_l and --clip_l_save_to go together"):
        merge_lora(["--flux_model", "f.safetensors", "--models", "a.safetensors", "--save_to", "o.safetensors",
                    "--clip_l", "clip_l.safetensors"])


def test_initial_step_continues_exactly_where_the_full_run_was(tiny_sd15_folder, demo_image_root, tmp_path):
    """A 4-step run, and a run started from its step-2 LoRA with --initial_step 2, end with the same LoRA:
    the second run trains steps 3 and 4 on the same batches and noise. SGD without momentum keeps no
    optimizer state, so nothing else could tell the runs apart."""
    from safetensors.torch import load_file

    from library.cli import run_training

    def train(output, *extra):
        run_training("sd", "network", [
            "--pretrained_model_name_or_path", tiny_sd15_folder, "--train_data_dir", demo_image_root,
            "--resolution", "64", "--output_dir", str(output), "--output_name", "out", "--seed", "7",
            "--train_batch_size", "1", "--optimizer_type", "SGD", "--learning_rate", "0.5",
            "--network_module", "networks.lora", "--network_dim", "2", "--network_alpha", "2",
            "--max_train_steps", "4", "--save_every_n_steps", "2", *extra])

    train(tmp_path / "full")
    train(tmp_path / "later", "--network_weights", str(tmp_path / "full" / "out-step00000002.safetensors"),
          "--initial_step", "2", "--skip_until_initial_step")
    full, later = load_file(tmp_path / "full" / "out.safetensors"), load_file(tmp_path / "later" / "out.safetensors")
    assert full.keys() == later.keys()
    assert all(torch_equal(full[key], later[key]) for key in full)
    step2 = load_file(tmp_path / "full" / "out-step00000002.safetensors")
    assert not all(torch_equal(full[key], step2[key]) for key in full)  # steps 3-4 did train
    assert sorted(os.listdir(tmp_path / "later")) == ["out.safetensors"]  # no step-2 save: it started there


def test_initial_step_must_leave_steps_to_train():
    from library.training.initial_step import initial_position
    from library.training.state import TrainingPosition

    args = argparse.Namespace(initial_step=None, initial_epoch=3, gradient_accumulation_steps=2, resume=None)
    start = TrainingPosition(global_step=0, epoch=1, batch_index=0, seed=5)
    assert initial_position(args, start, steps_per_epoch=4, num_batches=7, max_steps=20) == \
        TrainingPosition(global_step=8, epoch=3, batch_index=0, seed=5)
    args.initial_step = 6  # wins over --initial_epoch: epoch 2, third step -> micro-batch 4
    assert initial_position(args, start, steps_per_epoch=4, num_batches=7, max_steps=20) == \
        TrainingPosition(global_step=6, epoch=2, batch_index=4, seed=5)
    with pytest.raises(UserError, match="--initial_step 20 leaves nothing to train"):
        args.initial_step = 20
        initial_position(args, start, steps_per_epoch=4, num_batches=7, max_steps=20)


def _tracker_args(**values):
    base = dict(log_with=None, logging_dir=None, log_tracker_name=None, wandb_run_name=None, log_config=False)
    return argparse.Namespace(**{**base, **values})


def test_trackers_follow_log_with():
    from library.training.trackers import tracker_names, validate_tracker_args

    assert tracker_names(_tracker_args(logging_dir="logs")) == ["tensorboard"]
    assert tracker_names(_tracker_args()) == []
    with pytest.raises(UserError, match="--log_with tensorboard needs --logging_dir"):
        tracker_names(_tracker_args(log_with="tensorboard"))
    with pytest.raises(UserError, match="--wandb_run_name needs --log_with wandb or all"):
        validate_tracker_args(_tracker_args(logging_dir="logs", wandb_run_name="run"))


def test_wandb_without_the_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from library.training import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    for choice in ("wandb", "all"):
        with pytest.raises(UserError, match=f"--log_with {choice}: the wandb package is not installed; "
                                            "`pip install wandb`"):
            trackers.tracker_names(_tracker_args(log_with=choice, logging_dir="logs"))


def test_log_config_leaves_out_secrets_and_paths():
    from library.training.trackers import loggable_config

    config = loggable_config(argparse.Namespace(learning_rate=1e-4, network_args=["conv_dim=4"], output_dir="/home/me",
                                                wandb_api_key="secret", seed=None, full_bf16=True))
    assert config == {"learning_rate": 1e-4, "network_args": "['conv_dim=4']", "seed": None, "full_bf16": True}


def test_tensorboard_tracker_takes_the_tracker_name(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from library.training.trackers import start_trackers

    args = _tracker_args(log_with="tensorboard", logging_dir=str(tmp_path), log_tracker_name="my_project",
                         log_config=True, log_prefix=None)
    accelerator = Accelerator(log_with="tensorboard", project_config=ProjectConfiguration(
        project_dir=str(tmp_path), logging_dir=str(tmp_path)))
    start_trackers(accelerator, args)
    accelerator.log({"loss": 1.0}, step=1)
    accelerator.end_training()
    assert (tmp_path / "my_project").is_dir()


def test_xformers_is_not_switched_on_where_diffusers_would_drop_the_models_own_attention():
    from diffusers import Lumina2Transformer2DModel, UNet2DConditionModel

    from library.training.attention import _processors_without_xformers

    lumina = Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, hidden_size=64, num_layers=1,
                                       num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                                       norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(4, 6, 6),
                                       axes_lens=(300, 512, 512), cap_feat_dim=32)
    assert "Lumina2AttnProcessor2_0" in _processors_without_xformers(lumina)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    assert _processors_without_xformers(unet) is None


def test_xformers_falls_back_to_sdpa_with_one_warning(caplog):
    import torch

    from library.training.attention import apply_attention_backend

    class Denoiser(torch.nn.Module):
        switched = False

        def enable_xformers_memory_efficient_attention(self):
            self.switched = True

    denoiser = Denoiser()
    with caplog.at_level(logging.WARNING, logger="library.training.attention"):
        used = apply_attention_backend(argparse.Namespace(xformers=True), denoiser, torch.device("cpu"))
    assert used == "sdpa" and not denoiser.switched
    assert [r.getMessage().split(";")[0] for r in caplog.records] == \
        ["--xformers: " + ("the xformers package is not installed" if importlib_missing("xformers")
                           else "xformers needs a CUDA device")]
    assert apply_attention_backend(argparse.Namespace(xformers=False), denoiser, torch.device("cpu")) == "sdpa"


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_console_log_file_receives_the_log_lines(tmp_path):
    from library.cli import apply_console_log_args

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        apply_console_log_args(argparse.Namespace(console_log_level="WARNING", console_log_file=str(tmp_path / "x.log")))
        logging.getLogger("some.module").warning("kept")
        logging.getLogger("some.module").info("dropped")
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in root.handlers[len(handlers):]:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    text = (tmp_path / "x.log").read_text(encoding="utf-8")
    assert "WARNING some.module: kept" in text and "dropped" not in text


def test_docs_print_the_current_tables():
    from library.config.sd_scripts_compat import markdown_tables

    page = (Path(__file__).parent.parent / "docs" / "sd_scripts.md").read_text(encoding="utf-8")
    start = page.index("-->\n", page.index("<!-- sd_scripts_compat tables")) + len("-->\n")
    end = page.index("<!-- end of generated tables -->")
    assert page[start:end] == markdown_tables(), \
        "docs/sd_scripts.md is stale: paste library.config.sd_scripts_compat.markdown_tables() between the markers"


def test_numbered_text_encoder_lrs_of_the_sdxl_guide(tmp_path):
    base = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path), "--learning_rate", "1e-4"]
    _, args = _parse("sdxl", "network", base + ["--text_encoder_lr1", "1e-5", "--text_encoder_lr2", "2e-5"])
    assert args.text_encoder_lr == [1e-5, 2e-5]
    _, args = _parse("sdxl", "network", base + ["--text_encoder_lr2", "2e-5"])
    assert args.text_encoder_lr == [1e-4, 2e-5]  # TE1 falls back to --learning_rate


GUIDE_MODEL_FLAGS = ("--pretrained_model_name_or_path", "--clip_l", "--clip_g", "--t5xxl", "--ae", "--gemma2")
CUDA_ONLY_FLAGS = ("--blocks_to_swap",)  # needs a CUDA GPU; refused with its own message on a CPU


def guide_commands() -> list[tuple[str, str, str, list[str]]]:
    import re
    import shlex

    text = (Path(__file__).parent / "data" / "sd_scripts_guide_commands.txt").read_text(encoding="utf-8")
    commands = []
    for block in re.split(r"^== ", text, flags=re.M)[1:]:
        head, flags = block.split("\n", 1)
        script, family, mode, guide = head.split()
        commands.append((guide, family, mode, shlex.split(flags)))
    return commands


def localized(argv: list[str], root: Path, dataset_config: str) -> list[str]:
    """The guide's flags with its placeholder paths made local: models missing, the dataset real."""
    import re

    out = []
    for flag in argv:
        name, _, value = flag.partition("=")
        if name in CUDA_ONLY_FLAGS:
            continue
        if name == "--dataset_config":
            value = dataset_config
        elif name == "--output_dir":
            value = str(root / "out")
        elif name in GUIDE_MODEL_FLAGS:
            value = str(root / "missing" / re.sub(r"[^A-Za-z0-9.]+", "_", value.strip("<>")))
        out.append(f"{name}={value}" if value else name)
    return out


@pytest.fixture
def guide_dataset(tmp_path):
    from library.demo import write_demo_images

    images = write_demo_images(str(tmp_path / "images"), repeats=1)
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = '
                      f'"{Path(images, "1_shape").as_posix()}"\ncaption_extension = ".caption"\n', encoding="utf-8")
    return str(config)


@pytest.mark.parametrize("guide,family,mode,argv", guide_commands(), ids=lambda value: str(value)[:24])
def test_guide_command_lines_run_to_loading_the_model(guide, family, mode, argv, guide_dataset, tmp_path, capsys):
    """Each documented command parses, builds its dataset and stops only at the missing model file; the SDXL
    guide's line caches text-encoder outputs while training text-encoder LoRA, which sd-scripts refuses too."""
    from library.cli import run_training

    command = localized(argv, tmp_path, guide_dataset)
    with pytest.raises(SystemExit) as exit_info:
        run_training(family, mode, command)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    if guide == "sdxl_train_network.md":
        assert error.startswith("error: cached text-encoder outputs cannot train the text encoders: use "
                                "--network_train_unet_only")
        with pytest.raises(SystemExit):  # the message's other fix: its per-encoder learning rates then apply
            run_training(family, mode, [flag for flag in command if flag != "--cache_text_encoder_outputs"])
        error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --pretrained_model_name_or_path {tmp_path / 'missing'}")
    assert "no such file or folder" in error


def _schedule(name, steps=10, **flags):
    import torch

    from library.training.lr_schedulers import build_lr_scheduler

    args = argparse.Namespace(lr_scheduler=name, lr_warmup_steps=2, lr_scheduler_num_cycles=1, lr_scheduler_power=1.0,
                              lr_scheduler_type="", lr_scheduler_args=None, learning_rate=1.0, lr_decay_steps=0,
                              lr_scheduler_min_lr_ratio=None, lr_scheduler_timescale=None)
    for key, value in flags.items():
        setattr(args, key, value)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(args, optimizer, steps)
    rates = []
    for _ in range(steps + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_stable_decay_uses_lr_decay_steps_and_min_ratio():
    import math

    rates = _schedule("warmup_stable_decay", lr_decay_steps=4, lr_scheduler_min_lr_ratio=0.1)
    assert rates[:2] == pytest.approx([0.1, 0.55])  # linear warmup over 2 steps, from the min ratio (transformers)
    assert rates[2:7] == [1.0] * 5  # stable until the last 4 steps
    for step in range(6, 11):  # cosine from 1 down to the min ratio over the 4 decay steps
        assert rates[step] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 6) / 4)))
    assert _schedule("warmup_stable_decay", lr_decay_steps=0.4)[2:7] == [1.0] * 5  # a ratio of the 10 steps


def test_cosine_with_min_lr_and_inverse_sqrt():
    assert _schedule("cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.2)[10] == pytest.approx(0.2)
    rates = _schedule("inverse_sqrt", lr_scheduler_timescale=2)
    assert rates[2] == pytest.approx(1.0) and rates[8] == pytest.approx(0.5)  # 1 / sqrt(step / timescale)
    with pytest.raises(UserError, match="--lr_decay_steps is used only by warmup_stable_decay"):
        _schedule("cosine", lr_decay_steps=3)
