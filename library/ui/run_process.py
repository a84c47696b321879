"""Training runs as child processes of the UI: start, stop (SIGINT = the trainer's safe stop), poll.

A run is the real training script (`python <family>_train_network.py --config_file config.toml`),
its stdout and stderr appended to `<run>/train.log`. Stop sends SIGINT, which the trainer answers
by finishing the step and saving the LoRA and a resumable state (library/training/stop_signal.py);
Resume starts the same command with `--resume latest`. The child has its own process group, so a
Ctrl+C in the UI's terminal reaches it once, through `stop_all` (two would mean "stop at once").
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from library.errors import UserError
from library.ui.run_folder import LOG_FILE


class RunProcesses:
    """The runs this UI started, by run folder (at most one process per folder)."""

    def __init__(self):
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, run_dir: str, command: list[str]) -> None:
        with self._lock:
            if self.is_running(run_dir):
                raise UserError(f"{run_dir} is already training; stop it first")
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(os.path.join(run_dir, LOG_FILE), "a", encoding="utf-8") as log:
                log.write("$ " + " ".join(command) + "\n")
                log.flush()
                self._processes[run_dir] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                            stdin=subprocess.DEVNULL, env=env, cwd=run_dir,
                                                            start_new_session=True)

    def is_running(self, run_dir: str) -> bool:
        process = self._processes.get(run_dir)
        return process is not None and process.poll() is None

    def exit_code(self, run_dir: str) -> int | None:
        process = self._processes.get(run_dir)
        return None if process is None else process.poll()

    def stop(self, run_dir: str) -> bool:
        """Ask the run to save and exit at the end of its current step; False if it was not running."""
        process = self._processes.get(run_dir)
        if process is None or process.poll() is not None:
            return False
        process.send_signal(signal.SIGINT)
        return True

    def wait(self, run_dir: str, timeout: float | None = None) -> int | None:
        process = self._processes.get(run_dir)
        return None if process is None else process.wait(timeout)

    def stop_all(self, timeout: float = 120) -> None:
        for run_dir in list(self._processes):
            if self.stop(run_dir):
                self.wait(run_dir, timeout)
