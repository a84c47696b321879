"""Caption files, captions from folder names, and the per-step caption pipeline (exact outputs)."""

from __future__ import annotations

import os
import random

import pytest

from library.config.dataset_spec import CaptionOptions
from library.data.captions import (
    CaptionFileError,
    caption_from_path,
    expand_wildcards,
    is_path_skipped,
    process_caption,
    read_caption_file,
    replace_trigger,
    token_warmup_steps,
)
from library.errors import UserError


def run(caption: str, seed: int = 0, epoch: int = 1, step: int = 0, max_train_steps=None, **options) -> str:
    return process_caption(
        caption, CaptionOptions(**options), random.Random(seed), epoch, step, max_train_steps=max_train_steps
    )


# ---------------------------------------------------------------- caption files


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_caption_file_first_line_skips_comments_and_blank_lines(tmp_path):
    path = write(tmp_path / "a.txt", b"# written by the tagger\n\n   \n  1girl, red hair  \nsecond line\n")
    assert read_caption_file(path) == "1girl, red hair"


def test_caption_file_all_lines_for_multiline_wildcards(tmp_path):
    path = write(tmp_path / "a.txt", b"first\n# note\n\nsecond  \n")
    assert read_caption_file(path, all_lines=True) == "first\nsecond"


def test_caption_file_utf8_bom_and_crlf(tmp_path):
    path = write(tmp_path / "a.txt", "\ufeff猫, cat\r\nnext\r\n".encode("utf-8"))
    assert read_caption_file(path) == "猫, cat"


def test_caption_file_bom_then_comment(tmp_path):
    path = write(tmp_path / "a.txt", "\ufeff# comment\ncaption".encode("utf-8"))
    assert read_caption_file(path) == "caption"


def test_caption_file_missing_is_none_and_empty_is_empty_string(tmp_path):
    assert read_caption_file(str(tmp_path / "missing.txt")) is None
    assert read_caption_file(str(tmp_path)) is None  # a folder is not a caption file
    assert read_caption_file(write(tmp_path / "empty.txt", b"")) == ""
    assert read_caption_file(write(tmp_path / "comments.txt", b"# only\n#comments\n")) == ""


def test_caption_file_not_utf8_raises_caption_file_error(tmp_path):
    path = write(tmp_path / "latin1.txt", "caf\u00e9, tag".encode("latin-1"))
    with pytest.raises(CaptionFileError) as info:
        read_caption_file(path)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.path == path
    assert error.reason == "is not valid UTF-8 (byte 0xe9 at offset 3); save it as UTF-8"
    assert str(error) == f"caption file {path}: {error.reason}"


# ---------------------------------------------------------------- captions from folder names


def image_in(root, *parts) -> str:
    return os.path.join(str(root), *parts)


def test_caption_from_path_turns_folders_into_tags(tmp_path):
    assert caption_from_path(image_in(tmp_path, "long_hair", "x.png"), str(tmp_path)) == "long hair"
    nested = image_in(tmp_path, "red_dress", "outdoors", "x.png")
    assert caption_from_path(nested, str(tmp_path)) == "red dress, outdoors"


def test_caption_from_path_underscore_folder_adds_nothing_but_counts(tmp_path):
    path = image_in(tmp_path, "_misc", "blue_sky", "_unsorted", "x.png")
    assert caption_from_path(path, str(tmp_path)) == "blue sky"
    assert is_path_skipped(path, str(tmp_path)) is False
    assert caption_from_path(image_in(tmp_path, "_misc", "x.png"), str(tmp_path)) == ""


def test_caption_from_path_double_underscore_skips_everything_below(tmp_path):
    for parts in [("__old", "x.png"), ("__old", "long_hair", "x.png"), ("tags", "__drafts", "_a", "x.png")]:
        path = image_in(tmp_path, *parts)
        assert caption_from_path(path, str(tmp_path)) is None
        assert is_path_skipped(path, str(tmp_path)) is True


def test_caption_from_path_image_directly_in_image_dir(tmp_path):
    assert caption_from_path(image_in(tmp_path, "x.png"), str(tmp_path)) == ""
    # the image_dir's own name (like `10_class`) never becomes a tag, only folders below it
    root = tmp_path / "10__hidden_looking"
    assert caption_from_path(image_in(root, "x.png"), str(root)) == ""


def test_caption_from_path_relative_and_outside_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert caption_from_path(os.path.join("data", "smile", "x.png"), "data") == "smile"
    with pytest.raises(ValueError, match="is not inside"):
        caption_from_path(image_in(tmp_path, "other", "x.png"), str(tmp_path / "data"))


# ---------------------------------------------------------------- trigger word, prefix/suffix


def test_replace_trigger():
    assert replace_trigger("a photo of [trigger], [trigger] smiling", "sks") == "a photo of sks, sks smiling"
    assert replace_trigger("a photo of [trigger]", None) == "a photo of [trigger]"


def test_plain_caption_unchanged_and_first_line_only():
    assert run("1girl, solo") == "1girl, solo"
    assert run("first line\nsecond line") == "first line"
    assert run("keeps {braces|as is}") == "keeps {braces|as is}"


def test_trigger_prefix_suffix():
    caption = run("[trigger], red hair", trigger_word="ohwx", caption_prefix="masterpiece,", caption_suffix=", solo")
    assert caption == "masterpiece, ohwx, red hair , solo"


# ---------------------------------------------------------------- shuffle, keep_tokens, |||


def test_shuffle_with_seed_gives_exact_string():
    assert run("a, b, c, d, e", seed=0, shuffle_caption=True) == "c, b, a, e, d"
    assert run("a, b, c, d, e", seed=0, shuffle_caption=True, keep_tokens=1) == "a, d, b, c, e"
    assert run("a, b, c, d, e", seed=0, shuffle_caption=True) == run("a, b, c, d, e", seed=0, shuffle_caption=True)


def test_shuffle_uses_the_given_rng_on_the_flexible_tags():
    expected = ["b", "c", "d", "e"]
    random.Random(7).shuffle(expected)
    assert run("a, b, c, d, e", seed=7, shuffle_caption=True, keep_tokens=1) == ", ".join(["a"] + expected)


def test_keep_tokens_stay_first_for_every_seed():
    for seed in range(50):
        tags = run(" a , b,c, d, e, f ", seed=seed, shuffle_caption=True, keep_tokens=2).split(", ")
        assert tags[:2] == ["a", "b"]
        assert sorted(tags[2:]) == ["c", "d", "e", "f"]


def test_keep_tokens_alone_does_not_rearrange():
    assert run("a,b,  c", keep_tokens=1) == "a,b,  c"


def test_keep_tokens_separator_fixed_head_and_tail():
    caption = "1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt, smile ||| best quality, rating: general"
    for seed in range(30):
        tags = run(caption, seed=seed, shuffle_caption=True, keep_tokens_separator="|||").split(", ")
        assert tags[:3] == ["1girl", "hatsune miku", "vocaloid"]
        assert tags[-2:] == ["best quality", "rating: general"]
        assert sorted(tags[3:-2]) == ["microphone", "smile", "stage", "white shirt"]
    exact = run(caption, seed=1, shuffle_caption=True, keep_tokens_separator="|||")
    assert exact == "1girl, hatsune miku, vocaloid, smile, stage, white shirt, microphone, best quality, rating: general"


def test_keep_tokens_separator_once_keeps_only_the_head():
    for seed in range(20):
        tags = run("a, b ||| c, d, e", seed=seed, shuffle_caption=True, keep_tokens_separator="|||").split(", ")
        assert tags[:2] == ["a", "b"] and sorted(tags[2:]) == ["c", "d", "e"]


def test_keep_tokens_separator_wins_over_keep_tokens_when_present():
    assert run("a ||| b", shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||") == "a, b"
    # absent from the caption: keep_tokens applies
    tags = run("a, b, c, d", seed=3, shuffle_caption=True, keep_tokens=1, keep_tokens_separator="|||").split(", ")
    assert tags[0] == "a"


def test_keep_tokens_separator_in_prefix_and_suffix():
    caption = run(
        "stage, smile",
        seed=0,
        shuffle_caption=True,
        keep_tokens_separator="|||",
        caption_prefix="1girl, miku |||",
        caption_suffix=", screencap ||| masterpiece",
    )
    tags = caption.split(", ")
    assert tags[:2] == ["1girl", "miku"] and tags[-1] == "masterpiece"
    assert sorted(tags[2:-1]) == ["screencap", "smile", "stage"]


def test_empty_tags_are_dropped_when_rearranging():
    assert run("a,, b, ,c,", shuffle_caption=True, keep_tokens=3) == "a, b, c"


def test_custom_caption_separator_output_joined_with_comma_space():
    assert run("a;b;c", keep_tokens=3, shuffle_caption=True, caption_separator=";") == "a, b, c"


def test_empty_caption_separator_is_a_user_error():
    with pytest.raises(UserError, match="caption_separator"):
        run("a, b", shuffle_caption=True, caption_separator="")


# ---------------------------------------------------------------- secondary separator


def test_secondary_separator_replaced_without_shuffle():
    assert run("1girl, sky;;;cloud;;;day, outdoors", secondary_separator=";;;") == "1girl, sky,cloud,day, outdoors"


def test_secondary_separator_group_shuffles_as_one_tag():
    for seed in range(30):
        caption = run("a, sky;;;cloud;;;day, b, c", seed=seed, shuffle_caption=True, secondary_separator=";;;")
        assert sorted(caption.split(", ")) == ["a", "b", "c", "sky,cloud,day"]


# ---------------------------------------------------------------- tag dropout


def test_tag_dropout_never_drops_kept_tags():
    assert run("a, b, c, d", caption_tag_dropout_rate=1.0, keep_tokens=2) == "a, b"
    assert run("a ||| b, c ||| d", caption_tag_dropout_rate=1.0, keep_tokens_separator="|||") == "a, d"
    for seed in range(30):
        tags = run("k, x1, x2, x3, x4", seed=seed, caption_tag_dropout_rate=0.5, keep_tokens=1).split(", ")
        assert tags[0] == "k"


def test_tag_dropout_exact_with_seed():
    # one draw per flexible tag in order; a tag stays when its draw >= rate
    draws = random.Random(3)
    kept = [tag for tag in ["b", "c", "d", "e", "f"] if draws.random() >= 0.5]
    assert run("a, b, c, d, e, f", seed=3, caption_tag_dropout_rate=0.5, keep_tokens=1) == ", ".join(["a"] + kept)
    assert run("a, b, c, d, e, f", seed=3, caption_tag_dropout_rate=0.5, keep_tokens=1) == "a, c, e, f"


# ---------------------------------------------------------------- caption dropout


def test_caption_dropout_rate():
    assert run("a, b", caption_dropout_rate=1.0) == ""
    rng = random.Random(5)
    results = [process_caption("a", CaptionOptions(caption_dropout_rate=0.25), rng, 1, 0) for _ in range(400)]
    reference = random.Random(5)
    assert results == ["" if reference.random() < 0.25 else "a" for _ in range(400)]
    assert results.count("") == 94


def test_caption_dropout_every_n_epochs():
    dropped = [epoch for epoch in range(1, 10) if run("a, b", epoch=epoch, caption_dropout_every_n_epochs=3) == ""]
    assert dropped == [3, 6, 9]


def test_dropped_caption_skips_prefix_and_trigger():
    assert run("[trigger]", trigger_word="sks", caption_prefix="p", caption_dropout_rate=1.0) == ""


# ---------------------------------------------------------------- wildcards and multi-line captions


def test_wildcard_choice_exact_with_seed():
    assert run("1girl, {simple|white|black} background", seed=0, enable_wildcard=True) == "1girl, white background"
    choices = {run("{simple|white} background", seed=seed, enable_wildcard=True) for seed in range(40)}
    assert choices == {"simple background", "white background"}


def test_wildcard_escaped_braces_and_empty_braces():
    assert run("1girl, {{retro style}}", enable_wildcard=True) == "1girl, {retro style}"
    assert run("{{a|b}} and {}", enable_wildcard=True) == "{a|b} and {}"


def test_expand_wildcards_draws_in_order():
    reference = random.Random(11)
    expected = f"{reference.choice(['a', 'b'])}-{reference.choice(['c', 'd', 'e'])}"
    assert expand_wildcards("{a|b}-{c|d|e}", random.Random(11)) == expected


def test_multiline_caption_random_line_and_prefix_on_every_line():
    caption = "line one\n\nline two\nline three"
    seen = {run(caption, seed=seed, enable_wildcard=True, caption_prefix="sks,") for seed in range(40)}
    assert seen == {"sks, line one", "sks, line two", "sks, line three"}
    assert run(caption, seed=2, enable_wildcard=True) == "line one"


def test_multiline_with_wildcards_and_keep_separator():
    caption = "{red|blue} hair, smile\nportrait of {a cat|a dog}"
    result = run(caption, seed=4, enable_wildcard=True, caption_prefix="sks |||", shuffle_caption=True,
                 keep_tokens_separator="|||")
    assert result == "sks, smile, blue hair"


# ---------------------------------------------------------------- token warmup


def test_token_warmup_counts_by_step():
    options = dict(token_warmup_min=1, token_warmup_step=4)
    counts = [len(run("a, b, c, d, e", step=step, **options).split(", ")) for step in range(7)]
    assert counts == [1, 2, 3, 4, 5, 5, 5]
    assert run("a, b, c, d, e", step=2, **options) == "a, b, c"


def test_token_warmup_fraction_of_max_train_steps_and_kept_tokens():
    options = dict(token_warmup_min=2, token_warmup_step=0.5, keep_tokens=1)
    # 0.5 * 10 steps = 5 warmup steps over the 6 flexible tags: 2 + floor(step * 4 / 5)
    counts = [len(run("k, a, b, c, d, e, f", step=s, max_train_steps=10, **options).split(", ")) - 1 for s in range(7)]
    assert counts == [2, 2, 3, 4, 5, 6, 6]
    assert token_warmup_steps(CaptionOptions(token_warmup_step=0.25), 10) == 2
    assert token_warmup_steps(CaptionOptions(token_warmup_step=30), None) == 30
    assert token_warmup_steps(CaptionOptions(), None) == 0


def test_token_warmup_fraction_needs_max_train_steps():
    with pytest.raises(ValueError, match="max_train_steps"):
        run("a, b", token_warmup_step=0.5)


def test_token_warmup_then_shuffle_uses_first_tags():
    for seed in range(20):
        tags = run("a, b, c, d, e", seed=seed, step=1, shuffle_caption=True, token_warmup_min=1, token_warmup_step=4)
        assert sorted(tags.split(", ")) == ["a", "b"]
