"""The one error type for mistakes a user can fix, and the helper that suggests the right name.

Entry scripts catch `UserError`, print its message on one line and exit with code 2 (no traceback).
Raise it for bad config values, misspelled keys, missing or wrong checkpoints, unreadable images
when nothing usable is left, unwritable output folders: anything the user fixes, not us.
"""

from __future__ import annotations

import difflib
from typing import Iterable

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in the user's input; the message names the file/flag and how to fix it."""


def nearest_name(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean `x`?)' or '' - to append to an 'unknown key' message."""
    best = nearest_name(name, candidates)
    return f" (did you mean `{best}`?)" if best else ""
