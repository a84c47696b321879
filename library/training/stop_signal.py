"""Safe stop on SIGINT/SIGTERM (Ctrl+C in a terminal, Stop in the web UI, `kill` from a job system).

The trainer installs a `StopRequest` around its loop. The first SIGINT or SIGTERM only records the
request and logs what will happen; the trainer checks it once per optimizer step (after the step, its
sampling and validation), then saves the LoRA/model as `<output_name>-stepNNNNNNNN` with a resumable
state folder next to it (whatever --save_state says) and exits with code 0, so `--resume latest`
continues exactly where it stopped. A second signal raises KeyboardInterrupt at once: every file the
trainer writes goes through a temp file and a rename (library/atomic_io.py, state folders through
`.partial`), and the interrupted write removes its temp file or folder, so no half-written file is
left under a final name. With several processes every one stops at the same step (the flag is summed
over processes).
Signals before the loop starts keep Python's default behaviour: nothing is written yet, so setup
(loading, caching) stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager that turns the first stop signal into a flag and the second into KeyboardInterrupt."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.requested:
            logger.warning("%s again: stopping at once (files being written are discarded, saved ones kept)", name)
            raise KeyboardInterrupt(name)
        self.signal_name = name
        logger.warning("%s: finishing the current step, then saving the weights and a resumable state "
                       "(press Ctrl+C again to stop at once without saving)", name)

    def should_stop(self, accelerator) -> bool:
        """True on every process when any process got a stop signal (one collective per step with several)."""
        from library.training.distributed import sum_over_processes

        return sum_over_processes(accelerator, [1.0 if self.requested else 0.0])[0] > 0
