"""The parser internals the command line reads, each behind one function: argparse and jsonargparse offer no public
way to list a parser's options, an option's type hint or its subcommands' parsers. tests/test_cli_internals.py fails
loudly where a release changes them."""

from __future__ import annotations

from argparse import Action, ArgumentParser
from typing import Any


def option_actions(parser: ArgumentParser) -> dict[str, Action]:
    """Every option string of `parser` ("--trainer.max_epochs", "-h", ...) and its action."""
    return parser._option_string_actions


def type_hint(action: Action) -> Any:
    """The type hint jsonargparse made `action` from, or None."""
    return getattr(action, "_typehint", None)


def subcommand_parsers(parser: ArgumentParser) -> dict[str, ArgumentParser]:
    """The parser of each subcommand of `parser`, by name; empty where it has none."""
    action = getattr(parser, "_subcommands_action", None)
    return dict(action.choices) if action is not None else {}
