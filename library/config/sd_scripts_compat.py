"""sd-scripts flags that training scripts do not honour: the refusal table, and the flags accepted as no-ops.

Every flag sd-scripts defines for a script we have is either parsed with the same meaning, or listed
here. `REFUSED` maps a flag to why we do not take it and what to use instead; the parser knows these
flags (hidden from --help) so a command line or `--config_file` naming one stops with that line, all
refusals and unknown flags reported together. `ACCEPTED` lists flags that only select something we
already do (`--sdpa`: attention already runs on PyTorch's scaled-dot-product kernels); they parse and
log one line saying so. An entry may be limited to some families or modes; where a flag is parsed
for a script, its entry must not apply to that script (tests/test_sd_scripts_flags.py checks this
against sd-scripts' own flag lists). docs/sd_scripts.md prints both tables.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from library.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

NOT_YET = "not in this version"


class _Scoped:
    """An entry limited to `families` and `modes` (each empty = all)."""

    families: tuple[str, ...]
    modes: tuple[str, ...]

    def applies(self, family: str, mode: str) -> bool:
        return (not self.families or family in self.families) and (not self.modes or mode in self.modes)


@dataclass(frozen=True)
class Refusal(_Scoped):
    """Why a flag is refused and what to use instead."""

    reason: str
    instead: str
    families: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()

    def why(self) -> str:
        return f"{self.reason}; {self.instead}"

    def line(self, flag: str) -> str:
        return f"--{flag}: {self.why()}"


@dataclass(frozen=True)
class Accepted(_Scoped):
    """A flag that selects what we already do: parsed, and logged once with `note`."""

    note: str
    takes_value: bool = False
    choices: tuple[str, ...] = ()
    refused_values: tuple[tuple[str, str], ...] = ()  # (value, "why; what instead") pairs
    families: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()


_DIT = ("flux", "sd3", "lumina")
_HUB = Refusal("uploading to the Hugging Face Hub is not built in",
               "upload the output folder afterwards with `huggingface-cli upload`")
_DEEPSPEED = Refusal("DeepSpeed is set up through accelerate, not through training flags",
                     "put zero_stage/offload_* in an accelerate config file and run `accelerate launch --config_file "
                     "zero2.yaml ...` (docs/training.md, Multi-GPU)")
_DDP = Refusal("DDP options are not exposed", "set them in your accelerate config (`accelerate config`)")
_COMPILE = Refusal(f"torch.compile is {NOT_YET}", "train without it")
_METADATA = Refusal(f"model-spec metadata fields are {NOT_YET}",
                    "the trained file carries sd-scripts' ss_* training metadata; edit fields with a safetensors tool")

REFUSED: dict[str, Refusal] = {
    # saving, uploading, bookkeeping
    "huggingface_repo_id": _HUB, "huggingface_repo_type": _HUB, "huggingface_path_in_repo": _HUB,
    "huggingface_token": _HUB, "huggingface_repo_visibility": _HUB, "save_state_to_huggingface": _HUB,
    "resume_from_huggingface": _HUB, "async_upload": _HUB,
    "save_n_epoch_ratio": Refusal(NOT_YET, "use --save_every_n_epochs"),
    "output_config": Refusal("writing the arguments to a TOML file is " + NOT_YET,
                             "write the `--config_file` TOML by hand (keys are flag names without dashes)"),
    "use_safetensors": Refusal("files are always written as safetensors", "drop the flag"),
    "no_metadata": Refusal("the LoRA metadata is always written (loaders and our tools read it)", "drop the flag"),
    "training_comment": Refusal(f"a free-text metadata comment is {NOT_YET}", "drop the flag"),
    "metadata_title": _METADATA, "metadata_author": _METADATA, "metadata_description": _METADATA,
    "metadata_license": _METADATA, "metadata_tags": _METADATA,
    "tokenizer_cache_dir": Refusal("tokenizers are read from the model folder or the Hugging Face cache",
                                   "set HF_HOME to choose the cache folder"),
    # distributed and speed
    "deepspeed": _DEEPSPEED, "zero_stage": _DEEPSPEED, "offload_optimizer_device": _DEEPSPEED,
    "offload_optimizer_nvme_path": _DEEPSPEED, "offload_param_device": _DEEPSPEED,
    "offload_param_nvme_path": _DEEPSPEED, "zero3_init_flag": _DEEPSPEED, "zero3_save_16bit_model": _DEEPSPEED,
    "fp16_master_weights_and_gradients": _DEEPSPEED,
    "ddp_timeout": _DDP, "ddp_gradient_as_bucket_view": _DDP, "ddp_static_graph": _DDP,
    "torch_compile": _COMPILE, "dynamo_backend": _COMPILE,
    "use_flash_attn": Refusal("FlashAttention is chosen by PyTorch's scaled_dot_product_attention when it fits",
                              "drop the flag", families=("lumina",)),
    "use_sage_attn": Refusal("SageAttention is not supported", "drop the flag (PyTorch SDPA is used)",
                             families=("lumina",)),
    # memory features other versions add
    "fused_backward_pass": Refusal("fusing the optimizer step into the backward pass saves the gradients of a whole "
                                   "model, which only full fine-tuning has", "drop the flag (LoRA gradients are small)",
                                   modes=("network",)),
    "fused_optimizer_groups": Refusal("sd-scripts replaced it with --blockwise_fused_optimizers",
                                      "use --blockwise_fused_optimizers (or --fused_backward_pass with Adafactor)"),
    "blocks_to_swap": Refusal("block swap is for the large transformer families", "drop the flag",
                              families=("sd", "sdxl")),
    "split_mode": Refusal("sd-scripts replaced it with --blocks_to_swap", "use --blocks_to_swap",
                          families=("flux",)),
    "double_blocks_to_swap": Refusal("sd-scripts deprecated it for --blocks_to_swap", "use --blocks_to_swap",
                                     families=("flux",), modes=("full",)),
    "single_blocks_to_swap": Refusal("sd-scripts deprecated it for --blocks_to_swap", "use --blocks_to_swap",
                                     families=("flux",), modes=("full",)),
    "mem_eff_save": Refusal("saves are already streamed tensor by tensor", "drop the flag", modes=("full",)),
    # data
    "face_crop_aug_range": Refusal(NOT_YET, "crop images around faces beforehand"),
    "debug_dataset": Refusal(NOT_YET, "run tools/cache_latents.py to check that every image loads"),
    "dataset_class": Refusal("custom dataset classes are not supported", "describe the data in a --dataset_config TOML"),
    "caption_extention": Refusal("sd-scripts' old misspelling", "use --caption_extension"),
    "skip_latents_validity_check": Refusal("cache files are always checked against their images",
                                           "use --skip_cache_check to skip the content check", modes=("full",)),
    "text_encoder_batch_size": Refusal(NOT_YET, "text-encoder outputs are cached with the training batch size",
                                       families=_DIT),
    # network options
    "dim_from_weights": Refusal(NOT_YET, "give --network_dim equal to the rank of --network_weights",
                                modes=("network",)),
    "scale_weight_norms": Refusal(NOT_YET, "drop the flag (max-norm regularisation)", modes=("network",)),
    "base_weights": Refusal(NOT_YET, "merge that LoRA into the model first with tools/merge_lora.py",
                            modes=("network",)),
    "base_weights_multiplier": Refusal(NOT_YET, "merge that LoRA into the model first with tools/merge_lora.py",
                                       modes=("network",)),
    # training loop and schedule
    "lowram": Refusal("models are loaded tensor by tensor into their final device already", "drop the flag"),
    # logging
    "log_tracker_config": Refusal(f"tracker config files are {NOT_YET}", "configure wandb with its environment variables"),
    "wandb_api_key": Refusal("an API key on the command line or in a config file is easily leaked",
                             "run `wandb login` once or set WANDB_API_KEY"),
    # model options a family does not have
    "v2": Refusal("Stable Diffusion 2.x is trained with sd_train_network.py / sd_train.py", "drop the flag",
                  families=_DIT),
    "clip_skip": Refusal("this family's text encoders have no clip_skip (sd-scripts ignores it here too)", "drop the flag", families=_DIT),
    "max_token_length": Refusal("this family's token length has its own flag",
                                "use --t5xxl_max_token_length (FLUX/SD3) or --gemma2_max_token_length (Lumina)",
                                families=_DIT),
    "weighted_captions": Refusal("prompt weighting is an SD 1.x/2.x option (sd-scripts refuses it here too)",
                                 "write captions without (word:1.2) weights", families=_DIT),
    "vae": Refusal("this family reads its autoencoder from --ae (FLUX, Lumina) or from the checkpoint (SD3)",
                   "use --ae, or drop the flag for SD3", families=_DIT),
    "controlnet_model_name_or_path": Refusal("ControlNet training is not supported", "drop the flag",
                                             families=("flux",)),
    "no_half_vae": Refusal("the VAE of this family runs in fp32 when latents are cached; without caching it follows "
                           "--mixed_precision", "drop the flag", families=_DIT),
    "save_clip": Refusal("text encoders are saved with the model when they are trained", "drop the flag",
                         families=("sd3",)),
    "save_t5xxl": Refusal("text encoders are saved with the model when they are trained", "drop the flag",
                          families=("sd3",)),
    "t5xxl_device": Refusal("T5-XXL runs on the training device (or is cached with --cache_text_encoder_outputs)",
                            "drop the flag", families=("sd3",)),
    "t5xxl_dtype": Refusal("T5-XXL follows --mixed_precision", "drop the flag", families=("sd3",)),
    "sample_batch_size": Refusal("sample images are generated one at a time", "drop the flag", families=("lumina",)),
    "pos_emb_random_crop_rate": Refusal(NOT_YET, "drop the flag", families=("sd3",)),
    "enable_scaled_pos_embed": Refusal(NOT_YET, "drop the flag", families=("sd3",)),
    "num_last_block_to_freeze": Refusal(NOT_YET, "drop the flag", families=("sd3",), modes=("full",)),
    "train_t5xxl": Refusal(f"training T5-XXL is {NOT_YET}", "drop the flag", families=("sd3",), modes=("full",)),
    "learning_rate_te1": Refusal("per-encoder learning rates of a full fine-tune exist for SDXL only",
                                 "use --learning_rate_te", families=("sd", "flux", "sd3", "lumina"), modes=("full",)),
    "learning_rate_te2": Refusal("per-encoder learning rates of a full fine-tune exist for SDXL only",
                                 "use --learning_rate_te", families=("sd", "flux", "sd3", "lumina"), modes=("full",)),
    "learning_rate_te3": Refusal("per-encoder learning rates of a full fine-tune exist for SDXL only",
                                 "use --learning_rate_te", families=("sd3",), modes=("full",)),
    "block_lr": Refusal(f"per-block learning rates of a full fine-tune are {NOT_YET}", "use one --learning_rate",
                        families=("sdxl",), modes=("full",)),
}

ACCEPTED: dict[str, Accepted] = {
    "sdpa": Accepted("attention already runs on PyTorch's scaled_dot_product_attention (the default)"),
    "mem_eff_attn": Accepted("attention already runs on PyTorch's memory-efficient scaled_dot_product_attention"),
    "highvram": Accepted("the CUDA cache is not cleared between caching batches anyway"),
    "disable_mmap_load_safetensors": Accepted(
        "safetensors files are read tensor by tensor through safetensors' own reader whatever this flag says"),
    "console_log_simple": Accepted("log lines are already plain `LEVEL name: message` text"),
    "model_type": Accepted("FLUX.1 (dev/schnell) is what flux_train_network.py trains", takes_value=True,
                           choices=("flux", "chroma"), families=("flux",),
                           refused_values=(("chroma", "Chroma models are not supported; train a FLUX.1 dev or "
                                                       "schnell checkpoint"),)),
    "cache_info": Accepted("image sizes are read from the image file headers, which is fast; nothing is cached"),
    "persistent_data_loader_workers": Accepted(
        "the data loader is rebuilt each epoch to resume mid-epoch exactly; the flag changes nothing"),
}


# tools/merge_lora.py stands for sd-scripts' networks/merge_lora.py, sdxl_merge_lora.py and flux_merge_lora.py;
# their other flags are parsed there under the same names.
MERGE_LORA_REFUSED: dict[str, Refusal] = {
    "shuffle": Refusal("shuffling the rank order of the merged LoRA does not change what it does", "drop the flag"),
    "no_metadata": Refusal("the merged file always records its sources in its metadata", "drop the flag"),
    "lbws": Refusal(f"per-block merge weights are {NOT_YET}", "merge with one ratio per LoRA (--ratios)"),
    "diffusers": Refusal(f"merging into a FLUX single file with diffusers key names is {NOT_YET}",
                         "merge into the BFL-layout flux1-dev.safetensors or a diffusers model folder"),
}
MERGE_LORA_ACCEPTED: dict[str, Accepted] = {
    "v2": Accepted("the checkpoint's layout is read from its keys"),
    "precision": Accepted("the merge arithmetic always runs in float32 (sd-scripts' recommended value)",
                          takes_value=True, choices=("float", "fp16", "bf16")),
    "loading_device": Accepted("tensors are streamed from disk one at a time; --device chooses where they are merged",
                               takes_value=True),
    "mem_eff_load_save": Accepted("the checkpoint is always streamed tensor by tensor"),
}


def applicable_refusals(family: str, mode: str) -> dict[str, Refusal]:
    return {flag: entry for flag, entry in REFUSED.items() if entry.applies(family, mode)}


def applicable_accepted(family: str, mode: str) -> dict[str, Accepted]:
    return {flag: entry for flag, entry in ACCEPTED.items() if entry.applies(family, mode)}


class _RefusedFlag(argparse.Action):
    """A refused flag: swallows its values and records its name, so the parser reports it with its reason."""

    def __init__(self, option_strings, dest, refusal: Refusal, **kwargs):
        self.refusal = refusal
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        refused = list(getattr(namespace, REFUSED_DEST, []))
        refused.append(self.option_strings[0].lstrip("-"))
        setattr(namespace, REFUSED_DEST, refused)


REFUSED_DEST = "sd_scripts_refused_flags"


def is_refused_action(action: argparse.Action) -> bool:
    return isinstance(action, _RefusedFlag)


def add_compat_arguments(parser: argparse.ArgumentParser, family: str, mode: str) -> None:
    """The accepted no-op flags (shown in --help) and the refused ones (hidden) that apply to a
    training script and that the parser does not already parse."""
    add_accepted_flags(parser, applicable_accepted(family, mode))
    add_refused_flags(parser, applicable_refusals(family, mode))


def _parsed(parser: argparse.ArgumentParser) -> set[str]:
    return {option.lstrip("-") for action in parser._actions for option in action.option_strings}


def add_accepted_flags(parser: argparse.ArgumentParser, accepted: dict[str, Accepted]) -> None:
    accepted = {flag: entry for flag, entry in accepted.items() if flag not in _parsed(parser)}
    if not accepted:
        return
    group = parser.add_argument_group("accepted for sd-scripts compatibility (no effect here)")
    for flag, entry in accepted.items():
        if entry.takes_value:
            group.add_argument(f"--{flag}", default=None, choices=entry.choices or None, help=entry.note)
        else:
            group.add_argument(f"--{flag}", action="store_true", help=entry.note)


def add_refused_flags(parser: argparse.ArgumentParser, refused: dict[str, Refusal]) -> None:
    parsed = _parsed(parser)
    for flag, entry in refused.items():
        if flag not in parsed:
            parser.add_argument(f"--{flag}", action=_RefusedFlag, dest=REFUSED_DEST, refusal=entry)


def log_accepted_flags(args: argparse.Namespace, family: str, mode: str) -> None:
    """One log line per accepted no-op flag the user gave; a refused value of one is a UserError."""
    report_accepted_flags(args, applicable_accepted(family, mode))


def report_accepted_flags(args: argparse.Namespace, accepted: dict[str, Accepted]) -> None:
    for flag, entry in accepted.items():
        value = getattr(args, flag, None)
        if not value:
            continue
        refused = dict(entry.refused_values).get(value)
        if refused:
            raise UserError(f"--{flag} {value}: {refused}")
        logger.info("--%s: accepted for sd-scripts compatibility; %s", flag, entry.note)


def problem_line(name: str, parser: argparse.ArgumentParser) -> str:
    """Why `name` cannot be used: its refusal line, or 'no such flag' with the closest flag."""
    for action in parser._actions:
        if is_refused_action(action) and action.option_strings[0].lstrip("-") == name:
            return action.refusal.line(name)
    known = [option.lstrip("-") for action in parser._actions if not is_refused_action(action)
             for option in action.option_strings if option.startswith("--")]
    return f"--{name}: no such flag in this script{did_you_mean(name, known)}"


def _scope(entry) -> str:
    families = ", ".join(entry.families) if entry.families else "all"
    modes = {"network": "LoRA", "full": "full fine-tune"}
    mode = " / ".join(modes[m] for m in entry.modes) if entry.modes else "both"
    return f"{families}; {mode}"


def markdown_tables() -> str:
    """The refusal and no-op tables as docs/sd_scripts.md prints them (a test keeps the page in step)."""
    lines = ["| flag | scripts (families; mode) | why | use instead |", "|---|---|---|---|"]
    lines += [f"| `--{flag}` | {_scope(entry)} | {entry.reason} | {entry.instead} |"
              for flag, entry in sorted(REFUSED.items())]
    lines += ["", "Accepted, with one log line, because they select what already happens:", "",
              "| flag | scripts (families; mode) | what happens |", "|---|---|---|"]
    lines += [f"| `--{flag}` | {_scope(entry)} | {entry.note} |" for flag, entry in sorted(ACCEPTED.items())]
    lines += ["", "`tools/merge_lora.py` (for sd-scripts' `networks/merge_lora.py`, `sdxl_merge_lora.py`, "
              "`flux_merge_lora.py`):", "", "| flag | why / what happens | use instead |", "|---|---|---|"]
    lines += [f"| `--{flag}` | {entry.reason} | {entry.instead} |" for flag, entry in sorted(MERGE_LORA_REFUSED.items())]
    lines += [f"| `--{flag}` | accepted: {entry.note} | |" for flag, entry in sorted(MERGE_LORA_ACCEPTED.items())]
    return "\n".join(lines) + "\n"
