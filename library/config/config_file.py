"""`--config_file x.toml`: command-line arguments written in a TOML file, sd-scripts' convention.

Keys are flag names without the dashes; sections only group them for the reader
(`[training_arguments] learning_rate = 1e-4` is `--learning_rate 1e-4`). Values in the file become
the defaults and flags on the command line override them. Every key is checked against the
parser's own actions, so this works on any argparse parser: unknown keys name the closest flag,
store_true/store_false flags take true/false, flags with nargs take arrays, typed flags take values
their type accepts. This module also owns `load_toml`, shared with the dataset config loader.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from library.config.sd_scripts_compat import REFUSED_DEST, is_refused_action, problem_line
from library.errors import UserError, did_you_mean

_NOT_GIVEN = object()  # a config value meaning "as if the flag were not on the command line"
_LIST_NARGS = ("*", "+", argparse.REMAINDER)


def load_toml(path: str | Path) -> dict:
    """Parse a UTF-8 TOML file; a missing file or syntax error is a UserError naming file and line."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the file ({error.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {error.start}); save it as UTF-8") from None
    try:
        return _parse_toml_text(text)
    except ValueError as error:  # the parsers' syntax errors end with the line and column
        raise UserError(f"{path}: TOML syntax error: {error}") from None


def _parse_toml_text(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the `toml` package has the same loads() and a ValueError subclass
        import toml as tomllib
    return tomllib.loads(text)


def parse_args_with_config_file(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from the file given with `--config_file` (added if missing).

    Unknown flags and keys, and flags refused with a reason (library/config/sd_scripts_compat.py),
    are all reported in one UserError, from the command line and the file together."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config_action = _find_action(parser, "config_file")
    if config_action is None:
        config_action = parser.add_argument("--config_file", default=None,
                                            help="TOML file holding any of these arguments")
    config_path, problems = _peek_command_line(parser, config_action, argv)
    stored: dict[str, Any] = {}
    appended: dict[argparse.Action, list] = {}
    if config_path is not None:
        stored, appended, file_problems = _values_from_file(parser, config_action, config_path)
        problems += file_problems
    if problems:
        raise UserError(problems[0] if len(problems) == 1 else
                        f"{len(problems)} flags or keys cannot be used:\n  " + "\n  ".join(problems))
    if config_path is None:
        return parser.parse_args(argv)

    # A required flag set in the file must not make argparse complain that it is missing.
    from_file = [action for action in parser._actions if action.dest in stored or action in appended]
    with _not_required(from_file):
        namespace = parser.parse_args(argv, namespace=argparse.Namespace(**stored))
    for action, value in appended.items():
        # argparse appends command-line values to a preset list; the command line must replace it instead.
        if getattr(namespace, action.dest) is action.default:
            setattr(namespace, action.dest, value)
    return namespace


def _find_action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action | None:
    return next((action for action in parser._actions if action.dest == dest and action.option_strings), None)


def _peek_command_line(parser: argparse.ArgumentParser, config_action: argparse.Action,
                       argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config_file value, found by the parser itself so abbreviations resolve the same way;
    one line per refused or unknown flag on the command line)."""
    groups = [group for group in parser._mutually_exclusive_groups if group.required]
    for group in groups:
        group.required = False
    try:
        with _not_required(parser._actions):
            known, extras = parser.parse_known_args(argv)
    finally:
        for group in groups:
            group.required = True
    names = list(getattr(known, REFUSED_DEST, [])) + _unknown_names(extras)
    return getattr(known, config_action.dest), [problem_line(name, parser) for name in dict.fromkeys(names)]


def _unknown_names(extras: list[str]) -> list[str]:
    """Flag names among argparse's leftovers (values of unknown flags are skipped; a stray value is named)."""
    names, after_flag = [], False
    for token in extras:
        if token.startswith("-") and len(token) > 1 and not _is_number(token):
            names.append(token.lstrip("-").split("=", 1)[0])
            after_flag = True
        elif not after_flag:
            names.append(token)
    return names


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def _not_required(actions: list[argparse.Action]):
    relaxed = [action for action in actions if action.required]
    for action in relaxed:
        action.required = False
    try:
        yield
    finally:
        for action in relaxed:
            action.required = True


def _values_from_file(parser, config_action, path) -> tuple[dict[str, Any], dict[argparse.Action, list], list[str]]:
    """(dest -> value for the namespace, append-type action -> list, one line per unknown or refused key)."""
    by_name = _actions_by_name(parser)
    stored: dict[str, Any] = {}
    appended: dict[argparse.Action, list] = {}
    problems: list[str] = []
    for key, (value, where) in _flatten_sections(load_toml(path), path).items():
        action = by_name.get(key)
        if action is None:
            hint = did_you_mean(key, _usable_names(by_name))
            problems.append(f"{path}: unknown key `{where}`: no flag --{key} in this script{hint}")
            continue
        if is_refused_action(action):
            problems.append(f"{path}: `{where}`: {action.refusal.why()}")
            continue
        if action is config_action:
            raise UserError(f"{path}: `{where}`: a config file cannot name another config file")
        names_the_flag = key in (option.lstrip("-") for option in action.option_strings)
        converted = _convert(action, value, f"{path}: `{where}`", names_the_flag)
        if converted is _NOT_GIVEN:
            continue
        if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
            appended[action] = converted
        else:
            stored[action.dest] = converted
    return stored, appended, problems


def _usable_names(by_name: dict[str, argparse.Action]) -> list[str]:
    return [name for name, action in by_name.items() if not is_refused_action(action)]


def _flatten_sections(document: dict, path) -> dict[str, tuple[Any, str]]:
    """key -> (value, 'section.key' for messages); a key set in two sections is an error."""
    flat: dict[str, tuple[Any, str]] = {}
    for name, value in document.items():
        entries = value.items() if isinstance(value, dict) else [(name, value)]
        section = f"{name}." if isinstance(value, dict) else ""
        for key, item in entries:
            if key in flat:
                raise UserError(f"{path}: `{key}` is set twice (`{flat[key][1]}` and `{section}{key}`); keep one")
            flat[key] = (item, f"{section}{key}")
    return flat


def _actions_by_name(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    names: dict[str, argparse.Action] = {}
    flags = [action for action in parser._actions
             if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))]
    for action in flags:  # the option's own spelling first, then its dest
        for option in action.option_strings:
            names.setdefault(option.lstrip("-"), action)
    for action in flags:
        if not is_refused_action(action):
            names.setdefault(action.dest, action)
    return names


def _convert(action: argparse.Action, value: Any, where: str, names_the_flag: bool = True) -> Any:
    """The namespace value that `value` from the file stands for, or _NOT_GIVEN.

    For a flag without a value, `key = true` under the flag's own name means "flag given"; under its
    dest (`half_vae` for `--no_half_vae`) the value is the attribute's value.
    """
    if isinstance(action, argparse.BooleanOptionalAction):
        return _require_bool(value, where)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        wanted = _require_bool(value, where)
        given = wanted if names_the_flag else wanted == action.const
        return action.const if given else _NOT_GIVEN
    if isinstance(action, argparse._StoreConstAction):
        return action.const if _require_bool(value, where) else _NOT_GIVEN
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{where}: expected a count (0, 1, 2, ...), got {value!r}")
        return value
    if isinstance(action, argparse._AppendConstAction):
        raise UserError(f"{where}: this flag can only be given on the command line")
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
        items = _require_list(value, where, "one entry per use of the flag")
        if isinstance(action, argparse._AppendAction) and _takes_list(action):
            return [_convert_nargs(action, item, where) for item in items]
        return [_convert_scalar(action, item, where) for item in items]
    if _takes_list(action):
        return _convert_nargs(action, value, where)
    return _convert_scalar(action, value, where)


def _takes_list(action: argparse.Action) -> bool:
    return action.nargs in _LIST_NARGS or isinstance(action.nargs, int)


def _convert_nargs(action: argparse.Action, value: Any, where: str) -> list:
    items = _require_list(value, where, "write the values as [a, b, ...]")
    if action.nargs == "+" and not items:
        raise UserError(f"{where}: expected at least one value, got an empty array")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise UserError(f"{where}: expected an array of {action.nargs} values, got {len(items)}")
    return [_convert_scalar(action, item, where) for item in items]


def _require_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: expected true or false, got {value!r}")
    return value


def _require_list(value: Any, where: str, hint: str) -> list:
    if not isinstance(value, list):
        raise UserError(f"{where}: expected an array ({hint}), got {value!r}")
    return value


def _convert_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    converter = action.type
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: expected {_describe_type(converter)}, got {value!r}")
    if converter is None or converter is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string (write it in quotes), got {value!r}")
        converted = value
    elif converter is int and isinstance(value, float):
        raise UserError(f"{where}: expected an integer, got {value!r}")
    elif converter in (int, float) and not isinstance(value, str):
        converted = converter(value)
    else:
        text = value if isinstance(value, str) else str(value)
        try:
            converted = converter(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            detail = f" ({error})" if isinstance(error, argparse.ArgumentTypeError) else ""
            raise UserError(f"{where}: expected {_describe_type(converter)}, got {value!r}{detail}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(repr(choice) for choice in action.choices)
        raise UserError(f"{where}: {value!r} is not one of {choices}")
    return converted


def _describe_type(converter) -> str:
    if converter is int:
        return "an integer"
    if converter is float:
        return "a number"
    if converter is None or converter is str:
        return "a string"
    return f"a value for {getattr(converter, '__name__', 'this flag')}"
