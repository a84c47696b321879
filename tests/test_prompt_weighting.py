"""Weighted-caption parsing (A1111 grammar, exact floats) and per-token weights."""

import pytest

from library.prompt_weighting import parse_prompt_weights, tokenize_with_weights

BOS, EOS = 49406, 49407


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
             ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
        ),
        ("[faded]", [("faded", 1 / 1.1)]),
        ("[[x]]", [("x", 1 / 1.1 / 1.1)]),
        ("(cat:1.5) and (dog:0.8)", [("cat", 1.5), (" and ", 1.0), ("dog", 0.8)]),
        ("", [("", 1.0)]),
        ("ratio 16:9", [("ratio 16:9", 1.0)]),  # a colon outside brackets is text
        ("smile) wide]", [("smile) wide]", 1.0)]),  # unmatched closers are text
        ("x:1.5)", [("x:1.5)", 1.0)]),  # a weight without an open bracket is text
        (r"back\\slash", [("back\\slash", 1.0)]),
        ("a\\b", [("ab", 1.0)]),  # a lone backslash vanishes, as in A1111
        ("(a:b:1.2)", [("a:b", 1.2)]),
        ("(x:1.2.3)", [("x:1.2.3)", 1.1)]),  # not a number: text, and the bracket stays open
    ],
)
def test_parse_prompt_weights(text, expected):
    assert parse_prompt_weights(text) == expected


@pytest.fixture(scope="module")
def tokenizer():
    from library.models.clip_tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def test_tokenize_with_weights_pads_and_weights_each_token(tokenizer):
    ids, weights = tokenize_with_weights(tokenizer, "a (cat:1.5) photo", 77)
    a, cat, photo = (tokenizer(w).input_ids[1] for w in ("a", "cat", "photo"))
    assert ids[:5] == [BOS, a, cat, photo, EOS]
    assert ids[5:] == [tokenizer.pad_token_id] * 72 and len(ids) == 77
    assert weights == [1.0, 1.0, 1.5, 1.0] + [1.0] * 73


def test_multi_token_words_share_their_weight(tokenizer):
    word_ids = tokenizer("photorealistic").input_ids[1:-1]
    assert len(word_ids) > 1  # the point of the test: a word of several BPE tokens
    ids, weights = tokenize_with_weights(tokenizer, "[photorealistic]", 77)
    assert ids[1 : 1 + len(word_ids)] == word_ids
    assert weights[1 : 1 + len(word_ids)] == [1 / 1.1] * len(word_ids)
    assert weights[1 + len(word_ids)] == 1.0


def test_long_weighted_caption_is_truncated_to_the_content_length(tokenizer):
    ids, weights = tokenize_with_weights(tokenizer, "(cat:2.0) " * 100, 77)
    assert len(ids) == 77 and len(weights) == 77
    assert ids[0] == BOS and ids[-1] == EOS
    assert weights == [1.0] + [2.0] * 75 + [1.0]


def test_pad_id_follows_the_tokenizer():
    from library.models.clip_tokenizer import build_clip_tokenizer

    v2_tokenizer = build_clip_tokenizer(pad_token="!")
    ids, _ = tokenize_with_weights(v2_tokenizer, "cat", 10)
    assert ids == [BOS, v2_tokenizer("cat").input_ids[1], EOS] + [0] * 7
