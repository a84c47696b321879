"""Weighted captions: the `(word:1.2)` / `(word)` / `[word]` attention syntax of A1111 and sd-scripts.

`parse_prompt_weights(text)` splits a caption into (text, weight) runs with the same grammar and the
same floating-point results as A1111's `parse_prompt_attention` (which sd-scripts' weighted captions
use): `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:w)` by w, brackets nest multiplicatively, an
unclosed bracket applies to the rest of the text, an unmatched closing bracket is literal text, and
`\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters (a backslash before anything else vanishes).
`tokenize_with_weights(tokenizer, text, max_length)` turns those runs into padded token ids and one
weight per token, BOS/EOS/padding weighted 1.0. Written here because no maintained library exposes
this parser on its own.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# One lexical unit: an escape, an opening/closing bracket, ":<number>)", plain text, or a lone colon.
_UNIT = re.compile(
    r"\\[()\[\]\\]"  # escaped bracket or backslash -> literal character
    r"|\\"  # lone backslash -> dropped
    r"|[(\[]"  # opening bracket
    r"|:([+-]?[.\d]+)\)"  # explicit weight closing a round bracket
    r"|[)\]]"  # closing bracket
    r"|[^\\()\[\]:]+"  # plain text
    r"|:"  # a colon that does not start a weight
)


def _parse_weight(number: str) -> float | None:
    try:
        return float(number)
    except ValueError:  # e.g. "1.2.3": treated as literal text
        return None


def _merge_equal_neighbours(runs: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Caption -> [(text, weight), ...]; neighbours with equal weights merged; never empty."""
    runs: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_round: list[int] = []  # index into runs where each open "(" started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _UNIT.finditer(text):
        unit, number = match.group(0), match.group(1)
        weight = _parse_weight(number) if number is not None else None
        if unit.startswith("\\"):
            runs.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(runs))
        elif unit == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), weight)
        elif unit == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif unit == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            runs.append([unit, 1.0])

    for start in open_round:
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)
    if not runs:
        return [("", 1.0)]
    return _merge_equal_neighbours(runs)


def content_tokens_with_weights(tokenizer, text: str, max_content: int) -> tuple[list[int], list[float]]:
    """Token ids (without BOS/EOS) and their weights, truncated to max_content tokens."""
    ids: list[int] = []
    weights: list[float] = []
    for run_text, weight in parse_prompt_weights(text):
        run_ids = tokenizer(run_text).input_ids[1:-1]  # drop the BOS/EOS the tokenizer adds
        ids += run_ids
        weights += [weight] * len(run_ids)
    if len(ids) > max_content:
        logger.warning("weighted caption truncated to %d tokens: %r", max_content, text[:80])
        ids, weights = ids[:max_content], weights[:max_content]
    return ids, weights


def tokenize_with_weights(tokenizer, text: str, max_length: int) -> tuple[list[int], list[float]]:
    """[BOS] content [EOS] [PAD]... of exactly max_length ids, and one weight per id (1.0 outside content)."""
    ids, weights = content_tokens_with_weights(tokenizer, text, max_length - 2)
    padding = max_length - 2 - len(ids)
    ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    weights = [1.0] + weights + [1.0] * (padding + 1)
    return ids, weights
