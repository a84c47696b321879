"""The train page's settings as the `--config_file` TOML the CLI reads, and the command that runs it.

Per family: the LoRA script, the extra model files it takes (flag names as on the command line),
the defaults the family guides in docs/ use (learning rate, rank, resolution), and the memory
presets: sets of flags from those guides (mixed precision, caching, gradient checkpointing, fp8
base weights, block swap). `write_run_config` writes the TOML and checks it with the script's own
parser, so a setting the CLI would reject is reported in the UI before anything starts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from library.atomic_io import write_text_atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class FamilyChoice:
    label: str
    model_files: tuple[str, ...]  # extra model-file flags besides --pretrained_model_name_or_path
    learning_rate: float
    network_dim: int
    resolution: int

    def script(self, name: str) -> str:
        return os.path.join(REPO_ROOT, f"{name}_train_network.py")


FAMILIES = {
    "sd": FamilyChoice("Stable Diffusion 1.x / 2.x", (), 1e-4, 16, 512),
    "sdxl": FamilyChoice("SDXL", (), 1e-4, 32, 1024),
    "flux": FamilyChoice("FLUX.1 dev / schnell", ("clip_l", "t5xxl", "ae"), 1e-4, 16, 1024),
    "sd3": FamilyChoice("SD3 / SD3.5", ("clip_l", "clip_g", "t5xxl"), 1e-4, 16, 1024),
    "lumina": FamilyChoice("Lumina Image 2.0", ("gemma2", "ae", "gemma2_tokenizer"), 1e-4, 16, 1024),
}
MAX_MODEL_FILES = max(len(choice.model_files) for choice in FAMILIES.values())

_CACHED = {"cache_latents_to_disk": True, "gradient_checkpointing": True}
_CACHED_TE = {**_CACHED, "cache_text_encoder_outputs_to_disk": True, "network_train_unet_only": True}
# name -> flags; "CPU" is float32 (bf16 autocast is slow on CPUs), for the tiny demo model and tests
PRESETS = {
    "sd": {"24 GB": {"mixed_precision": "bf16", "cache_latents": True},
           "8-12 GB": {"mixed_precision": "bf16", **_CACHED},
           "CPU (float32)": {"mixed_precision": "no", "cache_latents": True}},
    "sdxl": {"24 GB": {"mixed_precision": "bf16", "no_half_vae": True, **_CACHED},
             "12-16 GB": {"mixed_precision": "bf16", "no_half_vae": True, **_CACHED_TE},
             "CPU (float32)": {"mixed_precision": "no", "cache_latents": True}},
    "flux": {"24 GB": {"mixed_precision": "bf16", "fp8_base": True, **_CACHED_TE},
             "12-16 GB": {"mixed_precision": "bf16", "fp8_base": True, "blocks_to_swap": 18, **_CACHED_TE},
             "CPU (float32)": {"mixed_precision": "no", "cache_latents": True}},
    "sd3": {"24 GB": {"mixed_precision": "bf16", **_CACHED_TE},
            "12-16 GB": {"mixed_precision": "bf16", "blocks_to_swap": 16, **_CACHED_TE},
            "CPU (float32)": {"mixed_precision": "no", "cache_latents": True}},
    "lumina": {"24 GB": {"mixed_precision": "bf16", **_CACHED_TE},
               "12-16 GB": {"mixed_precision": "bf16", "blocks_to_swap": 10, **_CACHED_TE},
               "CPU (float32)": {"mixed_precision": "no", "cache_latents": True}},
}
NETWORK_TYPES = ("LoRA", "LoRA + conv layers (LoCon)")


@dataclass
class RunSettings:
    family: str
    model: str
    dataset_config: str
    output_dir: str
    output_name: str
    model_files: dict[str, str] = field(default_factory=dict)  # flag -> path; empty ones are left out
    preset: str = "24 GB"
    network_type: str = "LoRA"
    network_dim: int = 16
    network_alpha: float = 16
    max_train_steps: int = 1000
    learning_rate: float = 1e-4
    seed: int = 42
    sample_prompts: str = ""  # one prompt per line (sd-scripts' line format: "a cat --n blurry --w 512")
    sample_every_n_steps: int = 0
    sample_size: int = 512  # --w/--h of prompts that do not set them
    sample_steps: int = 20  # --s of prompts that do not set it
    save_every_n_steps: int = 0


def config_document(settings: RunSettings, sample_prompts_file: str | None) -> dict:
    """The TOML tables: sections only group keys for the reader (library/config/config_file.py)."""
    model = {"pretrained_model_name_or_path": settings.model,
             **{flag: path for flag, path in settings.model_files.items() if path.strip()}}
    network = {"network_module": "networks.lora", "network_dim": int(settings.network_dim),
               "network_alpha": float(settings.network_alpha)}
    if settings.network_type == NETWORK_TYPES[1]:
        network["network_args"] = [f"conv_dim={int(settings.network_dim)}", f"conv_alpha={settings.network_alpha}"]
    training = {"max_train_steps": int(settings.max_train_steps), "learning_rate": float(settings.learning_rate),
                "seed": int(settings.seed), **PRESETS[settings.family][settings.preset]}
    output = {"output_dir": settings.output_dir, "output_name": settings.output_name,
              "logging_dir": os.path.join(settings.output_dir, "logs")}
    if settings.save_every_n_steps:
        output["save_every_n_steps"] = int(settings.save_every_n_steps)
    if sample_prompts_file:
        output.update(sample_prompts=sample_prompts_file, sample_every_n_steps=int(settings.sample_every_n_steps))
    return {"model_arguments": model, "dataset_arguments": {"dataset_config": settings.dataset_config},
            "network_arguments": network, "training_arguments": training, "output_arguments": output}


def with_sample_defaults(line: str, settings: RunSettings) -> str:
    """A prompt line with --w, --h and --s added where it does not set them (the family default is 1024 px)."""
    defaults = {"w": settings.sample_size, "h": settings.sample_size, "s": settings.sample_steps}
    words = line.split()
    return " ".join([line, *(f"--{flag} {int(value)}" for flag, value in defaults.items() if f"--{flag}" not in words)])


def write_run_config(settings: RunSettings, path: str) -> str:
    """Write the prompt file (if any) and the config TOML next to `path`; check it with the script's parser."""
    import toml

    from library.config.arguments import parse_training_args
    from library.families import get_family

    prompts = [with_sample_defaults(line.strip(), settings) for line in settings.sample_prompts.splitlines()
               if line.strip()]
    prompts_file = None
    if prompts and settings.sample_every_n_steps:
        prompts_file = os.path.join(os.path.dirname(path), "sample_prompts.txt")
        write_text_atomic(prompts_file, "\n".join(prompts) + "\n")
    text = toml.dumps(config_document(settings, prompts_file))
    write_text_atomic(path, text)
    parse_training_args(get_family(settings.family), "network", ["--config_file", path])
    return text


def training_command(family: str, config_path: str, resume: bool = False) -> list[str]:
    """The same command a user would type (`python <family>_train_network.py --config_file ...`)."""
    return [sys.executable, FAMILIES[family].script(family), "--config_file", config_path,
            *(["--resume", "latest"] if resume else [])]
