"""jsonargparse's error messages said in the command line's terms, with what the user probably meant.

`SuggestingErrors` is mixed into every parser of the `mst-clipiqa` command, the commands of `cli.commands` and the
Trainer's of `mst_clipiqa.cli.trainer`. Neither torch nor Lightning is imported here.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mst_clipiqa.errors import OptionError
from mst_clipiqa.internals import option_actions, parse_failure

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

    last_argv: Sequence[str] = ()
    """The arguments this parser parsed last."""
    last_subcommand_parser: SuggestingErrors | None = None
    """The parser of the subcommand whose arguments were parsed within that parse, if any: an error this parser
    reports after it is about that parser's options (jsonargparse checks a subcommand's config keys in the parent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # subcommand parsers inherit it (jsonargparse)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, *more: Any, **kwargs: Any) -> Any:
        self.last_argv = list(sys.argv[1:] if args is None else args)
        self.last_subcommand_parser = None
        parent = _PARSING.get()
        if parent is not None:  # jsonargparse parses a subcommand's arguments with its parser, inside the parent's
            parent.last_subcommand_parser = self
        token = _PARSING.set(self)
        try:
            return super().parse_args(args, *more, **kwargs)
        finally:
            _PARSING.reset(token)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(explain(message, self.last_subcommand_parser or self, self.last_argv), ex)


_PARSING: ContextVar[SuggestingErrors | None] = ContextVar("parsing", default=None)
"""The `SuggestingErrors` parser whose parse_args is running (in this thread)."""


def explain(message: str, parser: ArgumentParser, argv: Sequence[str] = ()) -> str:
    """A jsonargparse error message (of parsing `argv`) said in the options' terms, with what the user probably
    meant: the option or key closest to a misspelled one, or the allowed value closest to the one given."""
    if "did you mean" in message:  # explained already, by the parser of a nested parse
        return message
    failure = parse_failure(message)
    options = option_actions(parser)
    if failure.missing:
        return "missing " + ", ".join(f"--{name}" if f"--{name}" in options else name for name in failure.missing)
    if failure.unrecognized:
        given = [arg.split("=", 1)[0] for arg in failure.unrecognized if arg.startswith("--")]
        return message + did_you_mean(given, [option for option in options if option.startswith("--")])
    if failure.unknown_key:
        return message + did_you_mean([failure.unknown_key], [option.removeprefix("--") for option in options])
    if failure.unreadable_config:
        unreadable = [(path, err) for path, err in read_configs(argv) if isinstance(err, Exception)]
        return f"--config {unreadable[0][0]}: not a readable YAML file: {unreadable[0][1]}" if unreadable else message
    if failure.key and failure.value is not None:
        action = options.get(f"--{failure.key}")
        choices = [str(choice) for choice in (action.choices if action and action.choices else failure.choices)]
        if choices:
            value = failure.value.strip()
            return f"--{failure.key}: {value!r} is not one of {', '.join(choices)}" + did_you_mean([value], choices)
    return f"--{failure.key}: {failure.detail}" if failure.key else message


def did_you_mean(given: Sequence[str], known: Sequence[str]) -> str:
    """The "; did you mean X?" for the first of `given` that has a close match in `known`, else ""."""
    for name in given:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {close[0]}?"
    return ""


def read_configs(argv: Sequence[str]) -> list[tuple[Path, Any]]:
    """Each file given as --config in `argv`, with its YAML, or the error met reading it."""
    import yaml

    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    configs = []
    for path in map(Path, paths):
        try:
            configs.append((path, yaml.safe_load(path.read_text())))
        except (OSError, yaml.YAMLError) as err:
            configs.append((path, err))
    return configs
