"""The command line: every experiments/*.yaml parses against the CLI, so none can rot."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mst_clipiqa.cli import main
from mst_clipiqa.trainer_cli import MSTCLIPIQACLI

CONFIGS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


def test_there_are_configs():
    assert any(path.name == "demo.yaml" for path in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_validates_against_the_cli(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        MSTCLIPIQACLI(args=["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["checkpoint"]["monitor"] == "val/srcc" and resolved["checkpoint"]["mode"] == "max"
    assert resolved["model"]["net"]["variant"] in ("template", "prompt")


def test_a_wrong_key_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  net:\n    fusion_width: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        MSTCLIPIQACLI(args=["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "fusion_width" in capsys.readouterr().err


def test_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.net.variant" in out and "cross-attends to the prompt" in out
