"""The command line: every experiments/*.yaml parses against the CLI, so none can rot; the Trainer's commands and the
others share one option style, and a mistake says what was probably meant (tests/test_errors.py runs each mistake as
a user makes it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mst_clipiqa.cli.commands import command_parser, main, split_own_options
from mst_clipiqa.internals import option_actions

CONFIGS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))
DEMO = str(Path(__file__).parents[1] / "experiments" / "demo.yaml")


def test_there_are_configs():
    assert any(path.name == "demo.yaml" for path in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_validates_against_the_cli(config, cli_parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_parser.parse_args(["fit", "--config", str(config), "--print_config"])  # as `MSTCLIPIQACLI(args=...)` does
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["checkpoint"]["monitor"] == "val/srcc" and resolved["checkpoint"]["mode"] == "max"
    assert resolved["model"]["net"]["variant"] in ("template", "prompt")


def error_of(args: list[str], capsys) -> str:
    """The one-line report of a usage error."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    report = capsys.readouterr().err.splitlines()
    assert report[0].startswith(f"mst-clipiqa {args[0]}: error: ") and report[-1].endswith("lists the options")
    return report[0]


def test_a_wrong_key_a_misspelled_option_or_a_bad_value_says_what_was_meant(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  net:\n    fusion_width: 3\n")
    said = error_of(["fit", "--config", str(bad)], capsys)
    assert "'model.net.fusion_width'; did you mean model.net.fusion_dim?" in said
    said = error_of(["fit", "--config", DEMO, "--trainer.max_epohcs", "2"], capsys)
    assert said.endswith("unrecognized arguments: --trainer.max_epohcs 2; did you mean --trainer.max_epochs?")
    said = error_of(["validate", "--config", DEMO, "--ckpt_path", "last", "--data.protocol", "randm"], capsys)
    assert said.endswith("--data.protocol: 'randm' is not one of random, prompt, kfold, official; did you mean random?")
    bad.write_text("trainer:\n  max_epochs: [3\n")
    assert f"--config {bad}: not a readable YAML file" in error_of(["test", "--config", str(bad)], capsys)


def test_help_shows_field_docstrings(fit_help):
    out = fit_help
    assert "--model.net.variant" in out and "cross-attends to the prompt" in out


def test_every_command_takes_options_named_as_the_trainers_and_a_config_file(tmp_path, capsys):
    for name in ("score", "export", "benchmark", "demo"):
        options = [option for option in option_actions(command_parser(name)) if option.startswith("--")]
        assert all(option == option.lower() and "-" not in option[2:] for option in options), options
    config = tmp_path / "score.yaml"
    config.write_text("model: my-model\ninputs: [a.png, images/]\nout: scores.csv\nbatch_size: 4\n")
    parsed = command_parser("score").parse_args(["--config", str(config), "--batch_size", "2"])
    assert (parsed.model, parsed.inputs, parsed.batch_size) == ("my-model", ["a.png", "images/"], 2)  # argv wins
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    assert "--batch_size BATCH_SIZE" in out and "images per forward pass" in out and "--config CONFIG" in out


def test_benchmark_and_demo_pass_the_options_they_do_not_declare_on_to_the_fit():
    own, others = split_own_options(
        command_parser("benchmark"),
        ["--config", "a.yaml", "--splits", "3", "--trainer.max_steps", "-1", "--variants", "template", "prompt",
         "--data.root=data", "--name", "x"],
    )  # fmt: skip
    assert own == ["--splits", "3", "--variants", "template", "prompt", "--name", "x"]
    assert others == ["--config", "a.yaml", "--trainer.max_steps", "-1", "--data.root=data"]
