"""Captions: reading caption files, captions from folder names, and the per-step caption pipeline.

Owns the text side of a training example. `read_caption_file` and `caption_from_path` find the
caption of an image once, when the dataset is built; `process_caption` turns that text into the
caption of one training step (trigger word, caption dropout, multi-line choice, prefix/suffix,
wildcards, keep/shuffle/warmup/drop of tags, secondary separator), following sd-scripts' dataset
options and their meaning. All randomness comes from the `random.Random` the caller passes, so a
seeded run gives the same captions every time.

Where we differ from sd-scripts, on purpose:
- with several lines (enable_wildcard), the line is chosen before caption_prefix/suffix are added, so
  every line gets them (sd-scripts glues them to the first and last line of the whole text only);
- empty tags (`a,,b`, a trailing comma) are dropped instead of kept as empty strings;
- `[trigger]`, `#` comment lines and `caption_from_path` are additions other trainers' users expect.
"""

from __future__ import annotations

import math
import os
import random
import re
from typing import Optional

from library.config.dataset_spec import CaptionOptions
from library.errors import UserError

TRIGGER_PLACEHOLDER = "[trigger]"
TAG_JOINER = ", "  # sd-scripts joins rearranged tags with ", " whatever caption_separator is

# `{{` and `}}` are literal braces; `{a|b|c}` is a choice (non-empty, no braces inside).
_WILDCARD_PATTERN = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


class CaptionFileError(ValueError):
    """A caption file exists but cannot be read as text; the dataset skips its image with a warning."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"caption file {path}: {reason}")
        self.path = path
        self.reason = reason


# ---------------------------------------------------------------- reading captions


def read_caption_file(path: str, all_lines: bool = False) -> Optional[str]:
    """The caption in `path`: its first non-empty line that is not a `#` comment.

    Returns None when the file does not exist, "" when it holds no caption line. With
    `all_lines=True` (for enable_wildcard's multi-line captions) every caption line is returned,
    joined by "\\n". A leading UTF-8 BOM is ignored; other bytes that are not UTF-8 raise
    CaptionFileError.
    """
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CaptionFileError(path, f"cannot be read ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        reason = f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"
        raise CaptionFileError(path, reason) from e
    lines = [line.strip() for line in text.splitlines()]
    caption_lines = [line for line in lines if line and not line.startswith("#")]
    if all_lines:
        return "\n".join(caption_lines)
    return caption_lines[0] if caption_lines else ""


def _folders_between(image_path: str, image_dir: str) -> list[str]:
    """Folder names from image_dir (exclusive) down to the image's folder (inclusive)."""
    relative = os.path.relpath(os.path.abspath(image_path), os.path.abspath(image_dir))
    parts = relative.split(os.sep)
    if parts[0] == os.pardir:
        raise ValueError(f"{image_path} is not inside {image_dir}")
    return parts[:-1]


def is_path_skipped(image_path: str, image_dir: str) -> bool:
    """True when a folder between image_dir and the image starts with `__` (skip that whole tree)."""
    return any(name.startswith("__") for name in _folders_between(image_path, image_dir))


def caption_from_path(image_path: str, image_dir: str) -> Optional[str]:
    """Caption made of the folder names below image_dir: `hair/long_hair/x.png` -> "hair, long hair".

    A folder starting with `_` adds nothing (images below it still count); an image below a folder
    starting with `__` gets None (the dataset skips it). An image directly in image_dir gets "".
    """
    if is_path_skipped(image_path, image_dir):
        return None
    segments = []
    for name in _folders_between(image_path, image_dir):
        if name.startswith("_"):
            continue
        words = name.replace("_", " ").strip()
        if words:
            segments.append(words)
    return ", ".join(segments)


# ---------------------------------------------------------------- the per-step pipeline


def replace_trigger(text: str, trigger_word: Optional[str]) -> str:
    """`[trigger]` replaced by the trigger word (captions and sample prompts); unchanged without one."""
    if not trigger_word:
        return text
    return text.replace(TRIGGER_PLACEHOLDER, trigger_word)


def process_caption(
    caption: str,
    options: CaptionOptions,
    rng: random.Random,
    epoch: int,
    step: int,
    max_train_steps: Optional[int] = None,
) -> str:
    """The caption used for one training step.

    `epoch` is 1-based (caption_dropout_every_n_epochs drops the caption when epoch % n == 0);
    `step` is the number of optimizer steps done so far (token warmup); `max_train_steps` is needed
    only when token_warmup_step is a fraction (< 1) of the run.
    """
    if is_caption_dropped(options, rng, epoch):
        return ""
    caption = _choose_line(caption, options.enable_wildcard, rng)
    caption = replace_trigger(_add_prefix_suffix(caption, options), options.trigger_word)
    if options.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    warmup_steps = token_warmup_steps(options, max_train_steps)
    if options.shuffle_caption or warmup_steps > 0 or options.caption_tag_dropout_rate > 0:
        caption = _rearrange_tags(caption, options, rng, step, warmup_steps)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def is_caption_dropped(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    # Draw only when the rate is set, so enabling other options does not shift the random stream.
    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every_n = options.caption_dropout_every_n_epochs
    return dropped or (every_n > 0 and epoch % every_n == 0)


def _choose_line(caption: str, enable_wildcard: bool, rng: random.Random) -> str:
    """With enable_wildcard a random non-empty line, else the first line."""
    if "\n" not in caption:
        return caption
    if not enable_wildcard:
        return caption.split("\n")[0]
    lines = [line.strip() for line in caption.split("\n") if line.strip()]
    return rng.choice(lines) if lines else ""


def _add_prefix_suffix(caption: str, options: CaptionOptions) -> str:
    if options.caption_prefix:
        caption = options.caption_prefix + " " + caption
    if options.caption_suffix:
        caption = caption + " " + options.caption_suffix
    return caption


def expand_wildcards(text: str, rng: random.Random) -> str:
    """`{a|b|c}` becomes one of a, b, c; `{{` and `}}` become literal braces."""

    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return rng.choice(match.group(1).split("|"))

    return _WILDCARD_PATTERN.sub(replace, text)


def token_warmup_steps(options: CaptionOptions, max_train_steps: Optional[int]) -> int:
    """Steps over which the number of tags grows (0 = no warmup); a value < 1 is a fraction of the run."""
    warmup = options.token_warmup_step
    if warmup <= 0:
        return 0
    if warmup >= 1:
        return int(warmup)
    if max_train_steps is None:
        raise ValueError("token_warmup_step < 1 is a fraction of the run: pass max_train_steps")
    return math.floor(warmup * max_train_steps)


def _split_tags(text: str, separator: str) -> list[str]:
    if not separator:
        raise UserError("caption_separator must not be empty: remove it (default ',') or set a separator")
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def _split_kept_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible middle, fixed tail): by keep_tokens_separator if present, else keep_tokens."""
    separator = options.caption_separator
    keep_separator = options.keep_tokens_separator
    if keep_separator and keep_separator in caption:
        head, middle = caption.split(keep_separator, 1)
        tail = ""
        if keep_separator in middle:
            middle, tail = middle.split(keep_separator, 1)
        return _split_tags(head, separator), _split_tags(middle, separator), _split_tags(tail, separator)
    tags = _split_tags(caption, separator)
    keep = max(options.keep_tokens, 0)
    return tags[:keep], tags[keep:], []


def _warmup_tags(tags: list[str], options: CaptionOptions, step: int, warmup_steps: int) -> list[str]:
    """The first tags only, growing linearly from token_warmup_min to all of them over warmup_steps."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return tags
    minimum = options.token_warmup_min
    count = math.floor(step * ((len(tags) - minimum) / warmup_steps)) + minimum
    return tags[:count]


def _drop_tags(tags: list[str], rate: float, rng: random.Random) -> list[str]:
    if rate <= 0:
        return tags
    return [tag for tag in tags if rng.random() >= rate]


def _rearrange_tags(
    caption: str, options: CaptionOptions, rng: random.Random, step: int, warmup_steps: int
) -> str:
    """Warmup, shuffle and tag dropout applied to the flexible tags only; kept tags stay in place."""
    head, flexible, tail = _split_kept_tags(caption, options)
    flexible = _warmup_tags(flexible, options, step, warmup_steps)
    if options.shuffle_caption:
        rng.shuffle(flexible)
    flexible = _drop_tags(flexible, options.caption_tag_dropout_rate, rng)
    return TAG_JOINER.join(head + flexible + tail)
