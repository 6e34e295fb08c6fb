"""What the package relies on of its libraries beyond their public API, each behind one function: a parser's
options (argparse), what a parse error is about (jsonargparse raises it with a message and nothing else), and
Lightning's checkpoint format. tests/test_internals.py fails loudly, by name, where a release changes them."""

from __future__ import annotations

import ast
import re
from argparse import Action, ArgumentParser
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


def lightning_checkpoint(
    state_dict: dict[str, Tensor],
    *,
    epoch: int,
    global_step: int,
    hparams: dict[str, Any],
    datamodule_hparams: dict[str, Any],
    callbacks: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """A checkpoint in the format `Trainer.save_checkpoint` writes, of weights no Trainer holds (one member of a
    together run), without optimizer or loop state: Lightning has no public way to write one."""
    import lightning as L  # here: the command line imports this module for its help, which must stay fast

    return {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": L.__version__,
        "state_dict": state_dict,
        L.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY: hparams,
        L.LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY: datamodule_hparams,
        "callbacks": callbacks,
    }


def option_actions(parser: ArgumentParser) -> dict[str, Action]:
    """Every option string of `parser` ("--trainer.max_epochs", "-h", ...) and its action."""
    return parser._option_string_actions


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
    choices: tuple[Any, ...] = ()
    """The values of the Literal the message says the value is not one of."""


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
        literal = re.search(r"Literal\[(.*?)\]", message)
        return ParseFailure(
            key=key[1],
            value=given[1] if given else None,
            detail=message[key.end() :],
            choices=tuple(ast.literal_eval(f"[{literal[1]}]")) if literal else (),
        )
    return ParseFailure()
