"""`SuggestingErrors` on small jsonargparse parsers (tests/test_cli.py and tests/test_errors.py make the same mistakes
with the real commands): a subcommand's mistake is explained with the subcommand's options, whichever parser reports
it."""

from __future__ import annotations

from argparse import ArgumentError
from typing import Literal

import pytest
from jsonargparse import ActionConfigFile, ArgumentParser

from mst_clipiqa.cli.parse_errors import SuggestingErrors


class Parser(SuggestingErrors, ArgumentParser):
    pass


def top_parser() -> Parser:
    fit = Parser(prog="fit")
    fit.add_argument("--config", action=ActionConfigFile)
    fit.add_argument("--epochs", type=int, default=1)
    fit.add_argument("--net.variant", type=Literal["template", "prompt"], default="template")
    fit.add_argument("--out", type=str, required=True)
    top = Parser(prog="top", exit_on_error=False)
    top.add_subcommands().add_subcommand("fit", fit)
    return top


def error_of(args: list[str]) -> str:
    with pytest.raises(ArgumentError) as error:
        top_parser().parse_args(args)
    return error.value.message


def test_a_subcommands_mistake_says_what_was_meant(tmp_path):
    config = tmp_path / "fit.yaml"
    config.write_text("net:\n  varient: prompt\n")
    # Reported by the subcommand's parser, as it parses its arguments.
    assert error_of(["fit", "--out", "o", "--epohcs", "2"]).endswith("--epohcs 2; did you mean --epochs?")
    said = error_of(["fit", "--out", "o", "--net.variant", "promt"])
    assert said == "--net.variant: 'promt' is not one of template, prompt; did you mean prompt?"
    # Reported by the top parser, which checks the subcommand's config keys once it has parsed them.
    said = error_of(["fit", "--out", "o", "--config", str(config)])
    assert said.endswith("'net.varient'; did you mean net.variant?")
