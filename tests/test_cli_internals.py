"""The parser internals the command line reads (mst_clipiqa/cli/internals.py) are where it expects them: a release of
argparse or jsonargparse that moves them, or words its parse errors differently, fails here, by name, rather than as a
wrong or missing "did you mean"."""

from __future__ import annotations

from argparse import ArgumentError
from dataclasses import dataclass
from typing import Literal

import pytest
from jsonargparse import ActionConfigFile, ArgumentParser

from mst_clipiqa.cli.internals import ParseFailure, option_actions, parse_failure, type_hint


def test_options_and_their_type_hints_are_found():
    fit = ArgumentParser(prog="fit")
    fit.add_argument("--precision", type=Literal["32", "bf16"], default="32")
    fit.add_argument("--epochs", type=int, default=1)

    actions = option_actions(fit)
    assert {"--precision", "--epochs", "-h", "--help"} <= set(actions)
    assert type_hint(actions["--precision"]) == Literal["32", "bf16"]
    assert type_hint(actions["--epochs"]) is int


@dataclass
class Net:
    width: int = 1


def fit_parser() -> ArgumentParser:
    """A parser like the command line's: a config file, a positional, a required option, typed options, a group."""
    parser = ArgumentParser(prog="fit", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("model", type=str)
    parser.add_argument("--out", type=str, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", type=Literal["32", "bf16"] | None, default=None)
    parser.add_argument("--variants", type=Literal["template", "prompt"], nargs="+", default=["template"])
    parser.add_class_arguments(Net, "net")
    return parser


def message_of(parser: ArgumentParser, args: list[str]) -> str:
    with pytest.raises(ArgumentError) as error:
        parser.parse_args(args)
    return error.value.message


def test_what_a_parse_error_is_about_is_read_from_its_words(tmp_path):
    def config(text: str) -> str:
        path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(text)
        return str(path)

    def failure(*args: str, parser: ArgumentParser | None = None) -> ParseFailure:
        return parse_failure(message_of(parser or fit_parser(), list(args)))

    given = ("m", "--out", "o")
    assert failure("--out", "o") == ParseFailure(missing=("model",))
    assert failure("m") == ParseFailure(missing=("out",))
    assert failure(*given, "--epohcs", "2", "--net.widht=3") == ParseFailure(
        unrecognized=("--epohcs", "2", "--net.widht=3")
    )
    assert failure(*given, "--config", config("net:\n  widht: 3\n")) == ParseFailure(unknown_key="net.widht")
    assert failure(*given, "--config", config("epohcs: 3\n")) == ParseFailure(unknown_key="epohcs")
    assert failure(*given, "--config", config("epochs: [3\n")) == ParseFailure(unreadable_config=True)

    refused = failure(*given, "--epochs", "many")
    assert (refused.key, refused.value) == ("epochs", "many") and refused.detail.startswith("Expected a <class 'int'>")
    refused = failure(*given, "--precision", "bf61")  # a Union's message, the value on its last line
    assert (refused.key, refused.value) == ("precision", "bf61")
    refused = failure(*given, "--variants", "template", "promt")  # one element of a list
    assert (refused.key, refused.value) == ("variants", "promt")

    top = ArgumentParser(prog="top", exit_on_error=False)
    top.add_argument("--config", action=ActionConfigFile)
    top.add_subcommands().add_subcommand("fit", fit_parser())
    subcommand_key = failure("fit", *given, "--config", config("net:\n  widht: 3\n"), parser=top)
    assert subcommand_key == ParseFailure(unknown_key="net.widht")
    before_subcommand = failure("--config", config("epohcs: 3\n"), "fit", *given, parser=top)
    assert before_subcommand == ParseFailure(unknown_key="epohcs")

    assert parse_failure("something else entirely") == ParseFailure()
