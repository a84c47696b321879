"""The Gradio app: four tabs (Dataset, Train, Run, Runs) over one UIContext, and `main` for ui.py.

Served on 127.0.0.1 unless --host says otherwise (a warning then: anyone who can reach the port can
start processes and read files as this user, so use --auth user:password). Gradio may serve files
from the workspace only (sample images); thumbnails are sent as images, not as paths.
"""

from __future__ import annotations

import argparse
import logging
import signal

from library.errors import UserError
from library.ui import dataset_page, run_page, runs_page, train_page
from library.ui.context import UIContext

logger = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_app(context: UIContext):
    import gradio as gr

    with gr.Blocks(title="diffusion-trainer") as app:
        current_run = gr.State(None)
        with gr.Tabs() as tabs:
            with gr.Tab("Dataset", id="dataset"):
                dataset = dataset_page.build(context)
            with gr.Tab("Train", id="train"):
                train = train_page.build(context, current_run, tabs)
            with gr.Tab("Run", id="run"):
                run_page.build(context, current_run)
            with gr.Tab("Runs", id="runs", elem_id="runs_tab") as runs_tab:
                runs = runs_page.build(context, current_run, tabs)
        _wire_pages(context, dataset, train, runs, runs_tab)
    return app


def _wire_pages(context: UIContext, dataset: dict, train: dict, runs: dict, runs_tab) -> None:
    """Events that cross pages: the demo fills the Train page, a written dataset config is the one trained."""
    def demo_model():
        _, model = context.write_demo()
        return "sd", "CPU (float32)", model, 64

    dataset["demo"].click(demo_model, None, [train["family"], train["preset"], train["model"], train["sample_size"]])
    dataset["write"].click(lambda path: path, dataset["dataset_config"], train["dataset_config"])
    runs_tab.select(runs["refresh"], runs["runs"], runs["runs"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Web UI: prepare a dataset, start, watch, stop and resume training.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="ask for this user name and password")
    parser.add_argument("--workspace", default="ui_workspace",
                        help="folder for runs, the dataset config and the demo (default: ui_workspace)")
    args = parser.parse_args(argv)
    if args.auth is not None and (":" not in args.auth or not args.auth.split(":", 1)[0]):
        raise UserError("--auth: write it as user:password")
    return args


def exposure_warning(args: argparse.Namespace) -> str | None:
    if args.host in LOCAL_HOSTS:
        return None
    return (f"listening on {args.host}: anyone who can reach port {args.port} can start training runs and read files "
            f"as this user" + ("" if args.auth else "; add --auth user:password"))


def _interrupt(number, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    import os

    from library.cli import setup_logging

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    setup_logging()
    args = parse_args(argv)
    warning = exposure_warning(args)
    if warning:
        logger.warning(warning)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the web UI needs gradio: pip install -e '.[ui]' (setup.sh installs it)") from None
    context = UIContext(args.workspace)
    app = build_app(context)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl+C: close the server, stop the runs safely
    try:
        app.launch(server_name=args.host, server_port=args.port, auth=auth, allowed_paths=[context.workspace],
                   inbrowser=False, footer_links=[])
    finally:
        context.processes.stop_all()  # each run saves its LoRA and state (one SIGINT each), then exits
