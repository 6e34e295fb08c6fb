"""The parser internals the command line reads (mst_clipiqa/cli/internals.py) are where it expects them: a release of
argparse or jsonargparse that moves them fails here, by name, rather than as a wrong "did you mean"."""

from __future__ import annotations

from typing import Literal

from jsonargparse import ArgumentParser

from mst_clipiqa.cli.internals import option_actions, subcommand_parsers, type_hint


def test_options_their_type_hints_and_subcommand_parsers_are_found():
    fit = ArgumentParser(prog="fit")
    fit.add_argument("--precision", type=Literal["32", "bf16"], default="32")
    fit.add_argument("--epochs", type=int, default=1)
    top = ArgumentParser(prog="top")
    top.add_subcommands().add_subcommand("fit", fit)

    actions = option_actions(fit)
    assert {"--precision", "--epochs", "-h", "--help"} <= set(actions)
    assert type_hint(actions["--precision"]) == Literal["32", "bf16"]
    assert type_hint(actions["--epochs"]) is int
    assert subcommand_parsers(top) == {"fit": fit}
    assert subcommand_parsers(fit) == {}
