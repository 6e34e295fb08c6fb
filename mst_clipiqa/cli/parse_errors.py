"""jsonargparse's error messages said in the command line's terms, with what the user probably meant.

`SuggestingErrors` is mixed into every parser of the `mst-clipiqa` command, the commands of `cli.commands` and the
Trainer's of `mst_clipiqa.cli.trainer`. Neither torch nor Lightning is imported here.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from mst_clipiqa.cli.internals import option_actions, subcommand_parsers, type_hint
from mst_clipiqa.errors import OptionError

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser


NEED_WEIGHTS = ("validate", "test", "predict")
"""The Trainer's commands that evaluate a trained model: without weights they would score with an untrained head."""


def no_weights(command: str) -> OptionError:
    """The error of `command` (validate, test, predict) given no trained weights."""
    return OptionError(
        f"{command} needs trained weights: pass --ckpt_path (a .ckpt file of a fit, or last) or --model.init_from (a "
        "saved model folder or hub id)"
    )


class SuggestingErrors:
    """Mixed into a jsonargparse parser: a misspelled option or key, or a value that is not one of the choices, gets
    a "did you mean" in the error message. A shortened option is such a misspelling too (``allow_abbrev=False``):
    argparse would otherwise take ``--trainer.max_epoch`` for ``--trainer.max_epochs`` without a word."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # subcommand parsers inherit it (jsonargparse)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or _chosen_subcommand(self) or self
        super().error(explain(message, parser, getattr(self, "args", ())), ex)


UNKNOWN_KEY = r"(?:Group '([^']+)' does not accept|Subcommand '[^']+' does not accept|Option) (?:option )?'([^']+)'"
"""jsonargparse's words for a key it does not know (from a config file, or given as --key=value)."""


def explain(message: str, parser: ArgumentParser, argv: Sequence[str] = ()) -> str:
    """A jsonargparse error message (of parsing `argv`) said in the options' terms, with what the user probably
    meant: the option or key closest to a misspelled one, or the allowed value closest to the one given."""
    if "did you mean" in message:  # explained already, by the parser of a nested parse
        return message
    options = option_actions(parser)
    if match := re.match(r"the following arguments are required: (.*)", message):
        return "missing " + ", ".join(f"--{name}" if f"--{name}" in options else name for name in match[1].split(", "))
    if match := re.match(r"unrecognized arguments: (.*)", message):
        given = [arg.split("=", 1)[0] for arg in match[1].split() if arg.startswith("--")]
        return message + did_you_mean(given, [option for option in options if option.startswith("--")])
    if match := re.search(UNKNOWN_KEY, message):
        key = ".".join(filter(None, match.groups()))
        return message + did_you_mean([key], [option.removeprefix("--") for option in options])
    if message.startswith("Problems parsing config"):
        return next(filter(None, map(_yaml_error, config_paths(argv))), message)
    key = re.match(r'Parser key "([^"]+)"(?: element \d+)?:\s*', message)
    given = re.search(r"(?:Got|Given) value: (.*)$", message)
    if key and given:
        choices = [str(choice) for choice in _choices(options.get(f"--{key[1]}"))]
        if choices:
            value = given[1].strip()
            return f"--{key[1]}: {value!r} is not one of {', '.join(choices)}" + did_you_mean([value], choices)
    return f"--{key[1]}: {message[key.end() :]}" if key else message


def did_you_mean(given: Sequence[str], known: Sequence[str]) -> str:
    """The "; did you mean X?" for the first of `given` that has a close match in `known`, else ""."""
    for name in given:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {close[0]}?"
    return ""


def _choices(action: Any) -> list[Any]:
    """The values an action accepts: its argparse choices, or those of the Literal in its type hint."""
    if action is None:
        return []
    if action.choices:
        return list(action.choices)
    return list(_literal_values(type_hint(action)))


def _literal_values(hint: Any) -> Iterator[Any]:
    if typing.get_origin(hint) is Literal:
        yield from typing.get_args(hint)
    else:
        for argument in typing.get_args(hint):
            yield from _literal_values(argument)


def _chosen_subcommand(parser: ArgumentParser) -> ArgumentParser | None:
    """The parser of the subcommand named on the command line, where `parser` has subcommands."""
    subcommands = subcommand_parsers(parser)
    chosen = next((arg for arg in getattr(parser, "args", []) if arg in subcommands), None)
    return subcommands.get(chosen)


def config_paths(argv: Sequence[str]) -> list[Path]:
    """The files given as --config in `argv`."""
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    return [Path(path) for path in paths + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]]


def _yaml_error(path: Path) -> str | None:
    """What is wrong with the YAML of `path`, if anything."""
    import yaml

    try:
        yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        return f"--config {path}: not a readable YAML file: {err}"
    return None
