"""--config_file: a TOML file of command-line arguments whose values are defaults the command line
overrides, checked against the parser's own actions."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from library.config.config_file import load_toml, parse_args_with_config_file
from library.config.dataset_args import add_dataset_arguments
from library.config.dataset_config import load_dataset_group
from library.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--output_name", default="last")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_train_steps", type=int, default=1600)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--no_half_vae", dest="half_vae", action="store_false")
    parser.add_argument("--optimizer_args", nargs="*", default=None)
    parser.add_argument("--size", nargs=2, type=int, default=None)
    parser.add_argument("--sample_prompts", action="append", default=None)
    parser.add_argument("--verbose", "-v", action="count", default=0)
    parser.add_argument("--config_file", default=None)
    add_dataset_arguments(parser)
    return parser


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def parse(tmp_path: Path, toml_text: str, *argv: str, parser=None) -> argparse.Namespace:
    config = write(tmp_path / "args.toml", toml_text)
    return parse_args_with_config_file(parser or build_parser(), ["--config_file", str(config), *argv])


def error_of(tmp_path: Path, toml_text: str, *argv: str) -> str:
    with pytest.raises(UserError) as caught:
        parse(tmp_path, toml_text, *argv)
    return str(caught.value)


FULL = """
[model_arguments]
output_dir = "out"
mixed_precision = "bf16"

[training_arguments]
learning_rate = 3
max_train_steps = 10
gradient_checkpointing = true
no_half_vae = true
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
size = [64, "32"]
sample_prompts = ["a cat", "a dog"]
verbose = 2
resolution = "512,768"
"""


def test_file_values_become_the_parsed_values(tmp_path):
    args = parse(tmp_path, FULL)
    expected = {
        "output_dir": "out", "output_name": "last", "learning_rate": 3.0, "max_train_steps": 10,
        "mixed_precision": "bf16", "gradient_checkpointing": True, "half_vae": False,
        "optimizer_args": ["weight_decay=0.01", "betas=0.9,0.99"], "size": [64, 32],
        "sample_prompts": ["a cat", "a dog"], "verbose": 2, "resolution": (512, 768),
    }
    assert {key: getattr(args, key) for key in expected} == expected
    assert isinstance(args.learning_rate, float)


def test_command_line_overrides_the_file(tmp_path):
    args = parse(tmp_path, FULL, "--output_dir", "cli", "--learning_rate", "0.5", "--optimizer_args", "x=1",
                 "--sample_prompts", "a bird", "--resolution", "64", "--mixed_precision", "no")
    assert (args.output_dir, args.learning_rate, args.optimizer_args, args.sample_prompts, args.resolution,
            args.mixed_precision) == ("cli", 0.5, ["x=1"], ["a bird"], (64, 64), "no")
    assert args.max_train_steps == 10 and args.gradient_checkpointing is True


def test_required_flag_can_come_from_the_file_and_stays_required(tmp_path):
    parser = build_parser()
    args = parse(tmp_path, 'output_dir = "out"\n', parser=parser)
    assert args.output_dir == "out"
    assert next(action for action in parser._actions if action.dest == "output_dir").required is True
    with pytest.raises(SystemExit):
        parse_args_with_config_file(parser, [])


def test_without_config_file_it_is_plain_argparse():
    args = parse_args_with_config_file(build_parser(), ["--output_dir", "o", "--max_train_steps", "5"])
    assert (args.output_dir, args.max_train_steps, args.config_file, args.learning_rate) == ("o", 5, None, 1e-4)


def test_config_file_flag_is_added_to_any_parser(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1)
    assert parse(tmp_path, "steps = 4\n", parser=parser).steps == 4


def test_false_for_a_store_true_flag_means_not_given(tmp_path):
    args = parse(tmp_path, 'output_dir = "o"\ngradient_checkpointing = false\nshuffle_caption = false\n'
                           'no_half_vae = false\n')
    assert args.gradient_checkpointing is False
    assert args.shuffle_caption is None  # left unset, so it does not clash with --dataset_config
    assert args.half_vae is True
    assert parse(tmp_path, 'output_dir = "o"\nhalf_vae = false\n').half_vae is False  # by dest: the value itself


def test_unknown_key_names_file_section_key_and_nearest_flag(tmp_path):
    message = error_of(tmp_path, '[training_arguments]\noutput_dir = "o"\nlearning_rat = 1e-4\n')
    assert message == (f"{tmp_path / 'args.toml'}: unknown key `training_arguments.learning_rat`: no flag "
                       f"--learning_rat in this script (did you mean `learning_rate`?)")


@pytest.mark.parametrize("line, expected", [
    ('gradient_checkpointing = "true"', "`gradient_checkpointing`: expected true or false, got 'true'"),
    ("max_train_steps = 2.5", "`max_train_steps`: expected an integer, got 2.5"),
    ("max_train_steps = true", "`max_train_steps`: expected an integer, got True"),
    ('max_train_steps = "ten"', "`max_train_steps`: expected an integer, got 'ten'"),
    ("output_name = 5", "`output_name`: expected a string (write it in quotes), got 5"),
    ('mixed_precision = "fp8"', "`mixed_precision`: 'fp8' is not one of 'no', 'fp16', 'bf16'"),
    ('optimizer_args = "weight_decay=0.01"',
     "`optimizer_args`: expected an array (write the values as [a, b, ...]), got 'weight_decay=0.01'"),
    ("size = [64]", "`size`: expected an array of 2 values, got 1"),
    ('sample_prompts = "a cat"', "`sample_prompts`: expected an array (one entry per use of the flag), got 'a cat'"),
    ("verbose = -1", "`verbose`: expected a count (0, 1, 2, ...), got -1"),
    ('resolution = "512x768"',
     "`resolution`: expected a value for parse_resolution, got '512x768' "
     "(expected \"512\" or \"width,height\" like \"512,768\", got '512x768')"),
    ("learning_rate = [1, 2]", "`learning_rate`: expected a number, got [1, 2]"),
    ('config_file = "other.toml"', "`config_file`: a config file cannot name another config file"),
])
def test_wrong_values_name_file_key_and_expectation(tmp_path, line, expected):
    message = error_of(tmp_path, f'output_dir = "o"\n{line}\n')
    assert message == f"{tmp_path / 'args.toml'}: {expected}"


def test_number_types_convert_like_the_command_line(tmp_path):
    args = parse(tmp_path, 'output_dir = "o"\nlearning_rate = "1e-3"\nmax_train_steps = "7"\nresolution = 256\n')
    assert (args.learning_rate, args.max_train_steps, args.resolution) == (1e-3, 7, (256, 256))


def test_key_in_two_sections_is_an_error(tmp_path):
    message = error_of(tmp_path, '[a]\noutput_dir = "o"\n[b]\noutput_dir = "p"\n')
    assert message == (f"{tmp_path / 'args.toml'}: `output_dir` is set twice (`a.output_dir` and `b.output_dir`); "
                       f"keep one")


def test_toml_syntax_error_names_file_and_line(tmp_path):
    message = error_of(tmp_path, 'output_dir = "o"\n\nlearning_rate = = 1\n')
    assert message.startswith(f"{tmp_path / 'args.toml'}: TOML syntax error:") and "line 3" in message


def test_missing_and_non_utf8_config_files(tmp_path):
    with pytest.raises(UserError, match=r"nope\.toml: file not found$"):
        parse_args_with_config_file(build_parser(), ["--config_file", str(tmp_path / "nope.toml")])
    (tmp_path / "latin1.toml").write_bytes('output_name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.toml: not UTF-8 text \(bad byte at offset 18\)"):
        load_toml(tmp_path / "latin1.toml")


def test_folder_flags_from_config_file_clash_with_dataset_config(tmp_path):
    args = parse(tmp_path, 'output_dir = "o"\ndataset_config = "ds.toml"\ntrain_data_dir = "img"\n')
    with pytest.raises(UserError, match=r"so --train_data_dir would be ignored: list them as \[\[datasets.subsets\]\]"):
        load_dataset_group(args)


def test_abbreviated_config_file_flag_is_found_like_argparse_finds_it(tmp_path):
    config = write(tmp_path / "args.toml", 'output_dir = "o"\nmax_train_steps = 3\n')
    args = parse_args_with_config_file(build_parser(), ["--config_f", str(config)])
    assert (args.output_dir, args.max_train_steps, args.config_file) == ("o", 3, str(config))
