"""What the command line reads of argparse and jsonargparse that they do not offer publicly, each behind one function:
a parser's options, an option's type hint, and what a parse error is about (the libraries raise it with a message and
nothing else). tests/test_cli_internals.py fails loudly, by name, where a release changes them."""

from __future__ import annotations

import re
from argparse import Action, ArgumentParser
from dataclasses import dataclass
from typing import Any


def option_actions(parser: ArgumentParser) -> dict[str, Action]:
    """Every option string of `parser` ("--trainer.max_epochs", "-h", ...) and its action."""
    return parser._option_string_actions


def type_hint(action: Action) -> Any:
    """The type hint jsonargparse made `action` from, or None."""
    return getattr(action, "_typehint", None)


@dataclass(frozen=True)
class ParseFailure:
    """What a parse error says went wrong; empty where it says none of these."""

    missing: tuple[str, ...] = ()
    """The required arguments not given, by name ("out", "model"): argparse's and jsonargparse's check."""
    unrecognized: tuple[str, ...] = ()
    """The command-line arguments no option took, as given ("--epohcs", "2", "--x=1")."""
    unknown_key: str = ""
    """A key no option has, from a config file or --key=value ("model.net.fusion_width")."""
    unreadable_config: bool = False
    """A config file is not valid YAML (or JSON)."""
    key: str = ""
    """The option whose value was refused ("data.protocol")."""
    value: str | None = None
    """That value, where the message ends with it."""
    detail: str = ""
    """What the message says about that value, after naming its key."""


_UNKNOWN_KEY = r"(?:Group '([^']+)' does not accept|Subcommand '[^']+' does not accept|Option) (?:option )?'([^']+)'"


def parse_failure(message: str) -> ParseFailure:
    """What the message of a jsonargparse (or argparse) parse error is about, read from its wording."""
    if match := re.match(r"the following arguments are required: (.*)", message):
        return ParseFailure(missing=tuple(match[1].split(", ")))
    if match := re.match(r"unrecognized arguments: (.*)", message):
        return ParseFailure(unrecognized=tuple(match[1].split()))
    if match := re.search(_UNKNOWN_KEY, message):
        return ParseFailure(unknown_key=".".join(filter(None, match.groups())))
    if message.startswith("Problems parsing config"):
        return ParseFailure(unreadable_config=True)
    if key := re.match(r'Parser key "([^"]+)"(?: element \d+)?:\s*', message):
        given = re.search(r"(?:Got|Given) value: (.*)$", message)
        return ParseFailure(key=key[1], value=given[1] if given else None, detail=message[key.end() :])
    return ParseFailure()
