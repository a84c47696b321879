"""Train page: family, model files, memory preset, LoRA type and rank, steps, learning rate, sample
prompts; Start writes the run's folder (a copy of the dataset TOML, the `--config_file` TOML) and
starts the real training script on it (run_config.py, run_process.py)."""

from __future__ import annotations

import os
import re
import shutil

from library.errors import UserError
from library.ui.context import UIContext, shows_user_errors
from library.ui.run_config import FAMILIES, MAX_MODEL_FILES, NETWORK_TYPES, PRESETS, RunSettings, training_command, \
    write_run_config
from library.ui.run_folder import CONFIG_FILE, saved_files, write_family

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def create_run(context: UIContext, settings: RunSettings) -> str:
    """Make `<runs>/<output_name>/` with ds.toml and config.toml, start the script; returns the folder."""
    if not RUN_NAME.fullmatch(settings.output_name):
        raise UserError(f"run name {settings.output_name!r}: use letters, digits, '_', '-' or '.'")
    if not os.path.isfile(settings.dataset_config):
        raise UserError(f"dataset config {settings.dataset_config} does not exist; write it on the Dataset page")
    run_dir = os.path.join(context.runs_dir, settings.output_name)
    if saved_files(run_dir) or context.processes.is_running(run_dir):
        raise UserError(f"run {settings.output_name} already exists in {context.runs_dir}: choose another name, "
                        "or open it on the Runs page to resume it")
    os.makedirs(run_dir, exist_ok=True)
    dataset_copy = os.path.join(run_dir, "ds.toml")
    shutil.copyfile(settings.dataset_config, dataset_copy)
    settings.dataset_config, settings.output_dir = dataset_copy, run_dir
    config = os.path.join(run_dir, CONFIG_FILE)
    write_run_config(settings, config)
    write_family(run_dir, settings.family)
    context.processes.start(run_dir, training_command(settings.family, config))
    return run_dir


def model_file_boxes(family: str) -> list:
    import gradio as gr

    flags = FAMILIES[family].model_files
    return [gr.update(visible=i < len(flags), label=f"--{flags[i]}" if i < len(flags) else "", value="")
            for i in range(MAX_MODEL_FILES)]


def build(context: UIContext, current_run, tabs) -> dict:
    import gradio as gr

    with gr.Row():
        family = gr.Dropdown([(choice.label, name) for name, choice in FAMILIES.items()], value="sd",
                             label="Model family", elem_id="family")
        preset = gr.Dropdown(list(PRESETS["sd"]), value="24 GB", label="Memory preset (GPU VRAM)", elem_id="preset")
    model = gr.Textbox(label="Model (single file, diffusers folder or hub id)", elem_id="model")
    with gr.Row():
        model_files = [gr.Textbox(visible=False, elem_id=f"model_file_{i}") for i in range(MAX_MODEL_FILES)]
    with gr.Row():
        network_type = gr.Radio(list(NETWORK_TYPES), value=NETWORK_TYPES[0], label="LoRA type")
        dim = gr.Number(label="Rank (network_dim)", value=16, precision=0, minimum=1, elem_id="network_dim")
        alpha = gr.Number(label="Alpha", value=16, minimum=0)
    with gr.Row():
        steps = gr.Number(label="Steps", value=1000, precision=0, minimum=1, elem_id="steps")
        learning_rate = gr.Number(label="Learning rate", value=1e-4, elem_id="learning_rate")
        seed = gr.Number(label="Seed", value=42, precision=0)
        save_every = gr.Number(label="Save every N steps (0: only at the end)", value=0, precision=0, minimum=0)
    with gr.Row():
        prompts = gr.Textbox(label="Sample prompts (one per line)", lines=2, scale=3, elem_id="sample_prompts")
        sample_every = gr.Number(label="Sample every N steps (0: never)", value=100, precision=0, minimum=0,
                                 scale=1, elem_id="sample_every")
        sample_size = gr.Number(label="Sample size (px)", value=512, precision=0, minimum=64, scale=1,
                                elem_id="sample_size")
        sample_steps = gr.Number(label="Sample steps", value=20, precision=0, minimum=1, scale=1)
    with gr.Row():
        dataset_config = gr.Textbox(label="Dataset config file", value=context.default_dataset_config, scale=3,
                                    elem_id="train_dataset_config")
        run_name = gr.Textbox(label="Run name (folder and LoRA file name)", value="my_lora", scale=2, elem_id="run_name")
    start = gr.Button("Start training", variant="primary", elem_id="start")
    status = gr.Markdown(elem_id="train_status")

    def family_changed(name):
        choice = FAMILIES[name]
        presets = list(PRESETS[name])
        return [gr.update(choices=presets, value=presets[0]), choice.network_dim, choice.network_dim,
                choice.learning_rate, choice.resolution, *model_file_boxes(name)]

    @shows_user_errors
    def start_run(name, preset_name, model_path, *values):
        files, (kind, rank, alpha_value, step_count, lr, seed_value, save_n, prompt_text, sample_n, size, sample_s,
                ds, run) = \
            values[:MAX_MODEL_FILES], values[MAX_MODEL_FILES:]
        flags = FAMILIES[name].model_files
        settings = RunSettings(
            family=name, model=model_path.strip(), dataset_config=ds.strip(), output_dir="", output_name=run.strip(),
            model_files=dict(zip(flags, files)), preset=preset_name, network_type=kind, network_dim=rank,
            network_alpha=alpha_value, max_train_steps=step_count, learning_rate=lr, seed=seed_value,
            sample_prompts=prompt_text, sample_every_n_steps=sample_n, sample_size=size, sample_steps=sample_s,
            save_every_n_steps=save_n)
        if not settings.model:
            raise UserError("choose the model to train (a single file, a diffusers folder or a hub id)")
        run_dir = create_run(context, settings)
        return run_dir, gr.Tabs(selected="run"), f"started {run_dir}"

    family.change(family_changed, family, [preset, dim, alpha, learning_rate, sample_size, *model_files])
    start.click(start_run, [family, preset, model, *model_files, network_type, dim, alpha, steps, learning_rate, seed,
                            save_every, prompts, sample_every, sample_size, sample_steps, dataset_config, run_name],
                [current_run, tabs, status])
    return {"family": family, "preset": preset, "model": model, "dataset_config": dataset_config,
            "sample_size": sample_size}
