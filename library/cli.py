"""What every entry script runs: parse the flags for a family and mode, train, report errors.

A UserError (bad config, missing file, wrong checkpoint) is printed as one line on stderr and the
process exits with code 2, without a traceback. A second Ctrl+C (library/training/stop_signal.py)
exits with code 130 and one line. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

from library.errors import USER_ERROR_EXIT_CODE, UserError

INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process ended by Ctrl+C


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def add_console_log_arguments(group) -> None:
    group.add_argument("--console_log_level", choices=LOG_LEVELS, default=None,
                       help="lowest level of log lines shown (default INFO)")
    group.add_argument("--console_log_file", default=None, help="also append the log lines to this file")


def apply_console_log_args(args) -> None:
    """--console_log_level / --console_log_file, applied to the root logger."""
    root = logging.getLogger()
    if args.console_log_level:
        root.setLevel(args.console_log_level)
    if args.console_log_file:
        handler = logging.FileHandler(args.console_log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def run_training(family_name: str, mode: str, argv: list[str] | None = None) -> None:
    from library.families import get_family

    setup_logging()
    family = get_family(family_name)
    try:
        from library.config.arguments import parse_training_args
        from library.training.trainer import Trainer

        family, args = parse_training_args(family, mode, argv)
        Trainer(family, args).train()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        print("stopped at once: files being written were discarded; earlier saves are complete and kept",
              file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
