"""Runs page: the earlier runs in the workspace's runs folder with their settings, loss curve, samples
and LoRA files (the Run page's views, run_page.run_views); Open shows one on the Run page, where it
can be resumed."""

from __future__ import annotations

import os

from library.ui.context import UIContext
from library.ui.run_folder import CONFIG_FILE, list_runs
from library.ui.run_page import run_views, view_components


def settings_text(run_dir: str | None) -> str:
    if not run_dir or not os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        return ""
    with open(os.path.join(run_dir, CONFIG_FILE), encoding="utf-8") as f:
        return f.read()


def build(context: UIContext, current_run, tabs) -> dict:
    import gradio as gr

    with gr.Row():
        runs = gr.Dropdown([], label="Runs (newest first)", scale=4, elem_id="runs_list")
        refresh = gr.Button("Refresh", scale=1, elem_id="refresh_runs")
        open_run = gr.Button("Open on the Run page", scale=1, elem_id="open_run")
    views = view_components("runs")
    settings = gr.Code(label="Settings (config.toml)", language=None, elem_id="runs_settings")

    def refresh_list(selected):
        found = list_runs(context.runs_dir)
        choices = [(os.path.basename(path), path) for path in found]
        return gr.update(choices=choices, value=selected if selected in found else (found[0] if found else None))

    def show(run_dir):
        return (*run_views(context, run_dir), settings_text(run_dir))

    refresh.click(refresh_list, runs, runs)
    runs.change(show, runs, [*views, settings])
    open_run.click(lambda run_dir: (run_dir, gr.Tabs(selected="run")), runs, [current_run, tabs])
    return {"runs": runs, "refresh": refresh_list}
