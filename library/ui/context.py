"""What every page of one UI shares: the workspace folder, its runs folder and the running processes.

The workspace (`python ui.py --workspace DIR`, default `ui_workspace/`) holds `runs/<run name>/`
(one folder per training run, see run_folder.py), `ds.toml` (the dataset page's default output) and
`demo/` (the built-in demo: a tiny SD1.5-layout model and drawn images, library/demo.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from library.ui.run_process import RunProcesses


@dataclass
class UIContext:
    workspace: str
    processes: RunProcesses = field(default_factory=RunProcesses)

    def __post_init__(self):
        self.workspace = os.path.abspath(self.workspace)
        os.makedirs(self.runs_dir, exist_ok=True)

    @property
    def runs_dir(self) -> str:
        return os.path.join(self.workspace, "runs")

    @property
    def default_dataset_config(self) -> str:
        return os.path.join(self.workspace, "ds.toml")

    def write_demo(self) -> tuple[str, str]:
        """(image folder, model folder) of the built-in demo, written once."""
        from library.demo import write_demo_images, write_demo_model

        root = os.path.join(self.workspace, "demo")
        images = os.path.join(root, "images", "5_shape")
        if not os.path.isdir(images):  # written once: caption edits are kept
            write_demo_images(os.path.dirname(images), repeats=5)
        return images, write_demo_model(os.path.join(root, "tiny_sd15"))


def shows_user_errors(handler):
    """A page event handler whose UserError becomes Gradio's error pop-up (the message, no traceback)."""
    import functools

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        import gradio as gr

        from library.errors import UserError

        try:
            return handler(*args, **kwargs)
        except UserError as error:
            raise gr.Error(str(error)) from None

    return wrapped
