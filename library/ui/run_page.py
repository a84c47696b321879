"""Run page: one run, live. Every second it re-reads the run's folder (run_folder.py): step, loss,
learning rate and ETA, the loss plot, the newest samples, the saved LoRA files and the log tail.
Stop asks the trainer to save and exit at the current step; Resume restarts it with --resume latest.
The Runs page shows the same views for any earlier run (`run_views`)."""

from __future__ import annotations

import os

from library.errors import UserError
from library.ui.context import UIContext, shows_user_errors
from library.ui.run_config import training_command
from library.ui.run_folder import CONFIG_FILE, log_tail, read_family, read_progress, read_scalars, run_status, \
    sample_images, saved_files


def loss_frame(curves):
    import pandas as pd

    loss = curves.get("loss")
    return pd.DataFrame({"step": loss.steps if loss else [], "loss": loss.values if loss else []})


def files_markdown(run_dir: str) -> str:
    files = saved_files(run_dir)
    if not files:
        return "no LoRA file yet"
    return "\n".join(f"- `{os.path.join(run_dir, name)}`" for name in files)


def run_views(context: UIContext, run_dir: str | None) -> tuple:
    """(status, loss frame, samples, saved files, log tail) of a run folder."""
    if not run_dir:
        return "no run selected", loss_frame({}), [], "", ""
    curves = read_scalars(os.path.join(run_dir, "logs"))
    running = context.processes.is_running(run_dir)
    status = f"**{os.path.basename(run_dir)}**: {run_status(run_dir, running)}"
    if running or curves:
        status += f"; {read_progress(run_dir, curves).describe(running)}"
    code = context.processes.exit_code(run_dir)
    if code not in (None, 0):
        status += f" (the script exited with code {code}: see the log)"
    return status, loss_frame(curves), sample_images(run_dir), files_markdown(run_dir), log_tail(run_dir)


def view_components(prefix: str) -> list:
    import gradio as gr

    status = gr.Markdown(elem_id=f"{prefix}_status")
    with gr.Row():
        plot = gr.LinePlot(x="step", y="loss", title="Loss", height=260, elem_id=f"{prefix}_loss_plot", scale=3)
        samples = gr.Gallery(label="Newest samples", columns=2, height=260, elem_id=f"{prefix}_samples", scale=2,
                             allow_preview=False)
    files = gr.Markdown(elem_id=f"{prefix}_files")
    log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, elem_id=f"{prefix}_log")
    return [status, plot, samples, files, log]


def resume(context: UIContext, run_dir: str | None) -> str:
    if not run_dir or not os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        raise UserError("no run to resume: start one on the Train page or pick one on the Runs page")
    command = training_command(read_family(run_dir), os.path.join(run_dir, CONFIG_FILE), resume=True)
    context.processes.start(run_dir, command)
    return f"resumed {run_dir}"


def build(context: UIContext, current_run) -> dict:
    import gradio as gr

    views = view_components("run")
    with gr.Row():
        stop = gr.Button("Stop (save and exit at this step)", variant="stop", elem_id="stop")
        resume_button = gr.Button("Resume", elem_id="resume")
    message = gr.Markdown(elem_id="run_message")
    timer = gr.Timer(1.0)

    def stop_run(run_dir):
        if run_dir and context.processes.stop(run_dir):
            return "stop requested: the trainer finishes this step, saves the LoRA and a resumable state, then exits"
        return "nothing is running"

    timer.tick(lambda run_dir: run_views(context, run_dir), current_run, views, show_progress="hidden")
    stop.click(stop_run, current_run, message)
    resume_button.click(shows_user_errors(lambda run_dir: resume(context, run_dir)), current_run, message)
    return {}
