"""What a run's folder says about it: settings, loss and learning rate, samples, saved files, log tail.

A run started by the UI lives in `<runs folder>/<run name>/` and holds `config.toml` (the
`--config_file` it ran with), `family.txt` (which `<family>_train_network.py` runs it), `train.log` (the script's output), `logs/` (the TensorBoard logs the
trainer writes with --logging_dir), `sample/` (sample images) and the LoRA files and state folders.
Everything here is read back from those files, so a run started on the command line with the same
`--output_dir`/`--logging_dir` layout shows up the same way. Loss and learning rate come from the
event files through TensorBoard's own reader; a resumed run's later files override earlier steps.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

CONFIG_FILE = "config.toml"
LOG_FILE = "train.log"
FAMILY_FILE = "family.txt"  # the model family (which <family>_train_network.py runs it)
STEP_FILE = re.compile(r".*-step(\d+)\.safetensors$")


@dataclass
class Curve:
    steps: list[int]
    values: list[float]
    wall_times: list[float]


def read_scalars(log_dir: str) -> dict[str, Curve]:
    """Every scalar tag in the TensorBoard event files under `log_dir`, by step (later files win)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    by_tag: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True),
                       key=os.path.getmtime):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                number = _scalar(value)
                if number is not None:
                    by_tag.setdefault(value.tag, {})[event.step] = (number, event.wall_time)
    curves = {}
    for tag, points in by_tag.items():
        steps = sorted(points)
        curves[tag] = Curve(steps, [points[s][0] for s in steps], [points[s][1] for s in steps])
    return curves


def _scalar(value) -> float | None:
    if value.HasField("simple_value"):
        return value.simple_value
    if value.HasField("tensor") and len(value.tensor.float_val) == 1:
        return value.tensor.float_val[0]
    if value.HasField("tensor") and len(value.tensor.double_val) == 1:
        return value.tensor.double_val[0]
    return None


def read_config(run_dir: str) -> dict:
    """The run's `--config_file` settings as one flat dict (sections merged), {} without one."""
    from library.config.config_file import load_toml

    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    flat = {}
    for key, value in load_toml(path).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def write_family(run_dir: str, family: str) -> None:
    from library.atomic_io import write_text_atomic

    write_text_atomic(os.path.join(run_dir, FAMILY_FILE), family + "\n")


def read_family(run_dir: str) -> str:
    from library.errors import UserError

    path = os.path.join(run_dir, FAMILY_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: write the model family (sd, sdxl, flux, sd3 or lumina) into it")
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def saved_files(run_dir: str) -> list[str]:
    """LoRA/model files of the run, oldest first (names only)."""
    names = [name for name in os.listdir(run_dir) if name.endswith(".safetensors")] if os.path.isdir(run_dir) else []
    return sorted(names, key=lambda name: os.path.getmtime(os.path.join(run_dir, name)))


def state_folders(run_dir: str) -> list[str]:
    return sorted(name for name in os.listdir(run_dir) if name.endswith("-state")) if os.path.isdir(run_dir) else []


def sample_images(run_dir: str, newest: int = 8) -> list[str]:
    """The newest sample images (contact sheets left out), newest first."""
    paths = [path for path in glob.glob(os.path.join(run_dir, "sample", "*.png")) if "contact_sheet" not in path]
    return sorted(paths, key=os.path.getmtime, reverse=True)[:newest]


def log_tail(run_dir: str, lines: int = 30) -> str:
    path = os.path.join(run_dir, LOG_FILE)
    if not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    # tqdm redraws its bar with carriage returns: keep the last state of each line
    return "\n".join(line.split("\r")[-1] for line in text.rstrip("\n").split("\n")[-lines:])


@dataclass
class Progress:
    step: int
    max_steps: int
    loss: float | None
    learning_rate: float | None
    seconds_per_step: float | None

    @property
    def eta_seconds(self) -> float | None:
        if self.seconds_per_step is None:
            return None
        return max(0, self.max_steps - self.step) * self.seconds_per_step

    def describe(self, running: bool = True) -> str:
        if self.step == 0:
            return "starting (loading the model, caching latents)"
        parts = [f"step {self.step}/{self.max_steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:.2e}")
        if running and self.eta_seconds is not None and self.step < self.max_steps:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        return ", ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def read_progress(run_dir: str, curves: dict[str, Curve] | None = None) -> Progress:
    """Step, latest loss and learning rate, and time per step (over the last 20 steps) of a run."""
    curves = read_scalars(os.path.join(run_dir, "logs")) if curves is None else curves
    max_steps = int(read_config(run_dir).get("max_train_steps", 0))
    loss, lr = curves.get("loss"), curves.get("lr")
    if not loss or not loss.steps:
        return Progress(0, max_steps, None, None, None)
    window = min(20, len(loss.steps) - 1)
    per_step = None
    if window > 0:
        per_step = (loss.wall_times[-1] - loss.wall_times[-1 - window]) / (loss.steps[-1] - loss.steps[-1 - window])
    return Progress(loss.steps[-1], max_steps, loss.values[-1], lr.values[-1] if lr and lr.values else None, per_step)


def list_runs(runs_dir: str) -> list[str]:
    """Run folders (ones holding a config.toml) under `runs_dir`, newest first."""
    if not os.path.isdir(runs_dir):
        return []
    runs = [os.path.join(runs_dir, name) for name in os.listdir(runs_dir)
            if os.path.isfile(os.path.join(runs_dir, name, CONFIG_FILE))]
    return sorted(runs, key=lambda path: os.path.getmtime(os.path.join(path, CONFIG_FILE)), reverse=True)


def run_status(run_dir: str, running: bool) -> str:
    """running / finished / stopped at step N (resumable) / not finished."""
    if running:
        return "running"
    name = read_config(run_dir).get("output_name", "")
    files = saved_files(run_dir)
    if f"{name}.safetensors" in files:
        return "finished"
    steps = [int(match.group(1)) for match in map(STEP_FILE.match, files) if match]
    if steps and state_folders(run_dir):
        return f"stopped at step {max(steps)} (Resume continues it)"
    return "not finished"
