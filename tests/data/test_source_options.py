"""`data.source_options`: the column mapping of the table and hf sources as one typed option (`Columns`), documented
in the command's help, checked when parsed, and kept as plain data in checkpoints and in the run's config.yaml."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import yaml
from release_fixtures import make_agiqa3k

from mst_clipiqa.cli.commands import main
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.data.tables import Columns
from mst_clipiqa.errors import OptionError

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

INHOUSE = str(Path(__file__).parents[2] / "experiments" / "inhouse_table.yaml")
MAPPING = Columns(image_column="file", mos_columns={"quality": "score"})


def printed_config(parser, args: list[str], capsys) -> dict:
    """The fit config the command line resolves `args` to, as `--print_config` writes it (and a run its config.yaml),
    parsed by `MSTCLIPIQACLI`'s parser (conftest.py's `cli_parser`)."""
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_help_lists_every_field_with_its_docstring(fit_help, capsys):
    assert "--data.source_options.help" in fit_help
    with pytest.raises(SystemExit):
        main(["fit", "--data.source_options.help", "Columns"])
    out = " ".join(capsys.readouterr().out.split())  # help wraps its lines to the terminal's width
    assert all(f"--data.source_options.{field.name}" in out for field in fields(Columns))
    assert "keeps rows together in prompt-disjoint splits" in out


@pytest.mark.parametrize(
    "given",
    [
        [],
        ["--data.source_options.prompt_column", "prompt"],
        ["--data.source_options.mos_columns", "{quality: score, alignment: align_score}"],
        ["--data.source_options", json.dumps({"image_column": "file", "mos_columns": {"quality": "score"}})],
    ],
    ids=["config", "one field", "a mapping field", "json"],
)
def test_the_documented_forms_parse_and_a_saved_config_reads_back_the_same(given, cli_parser, tmp_path, capsys):
    resolved = printed_config(cli_parser, ["--config", INHOUSE, *given], capsys)
    options = resolved["data"]["source_options"]
    assert options["image_column"] == "file" and options["mos_columns"]["quality"] == "score"
    assert options["prompt_column"] == ("prompt" if "--data.source_options.prompt_column" in given else None)
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(resolved))
    assert printed_config(cli_parser, ["--config", str(saved)], capsys) == resolved


@pytest.mark.parametrize(
    "given",
    [
        ["--data.source_options.prompt_colum", "prompt"],
        ["--data.source_options", json.dumps({"image_colum": "file", "mos_columns": {"quality": "score"}})],
    ],
    ids=["option", "json"],
)
def test_a_key_that_is_no_field_is_refused_when_parsed(given, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", INHOUSE, *given])
    assert exit_info.value.code == 2
    assert "is not accepted" in capsys.readouterr().err


def test_the_data_module_keeps_the_mapping_as_plain_data_for_checkpoints(tmp_path):
    data = IQADataModule(source="table", root="labels.csv", source_options=MAPPING)
    assert data.columns == MAPPING
    assert data.hparams.source_options == data.hparams_initial.source_options == asdict(MAPPING)  # what loggers record
    # Checkpoints are read with weights_only=True, and a resumed run compares the settings read back with its own.
    torch.save({"datamodule_hyper_parameters": dict(data.hparams)}, tmp_path / "saved.ckpt")
    saved = torch.load(tmp_path / "saved.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert saved == dict(data.hparams)
    again = IQADataModule(**saved)  # as `load_from_checkpoint` builds it
    assert again.columns == MAPPING and dict(again.hparams) == saved
    with pytest.raises(OptionError, match="expected mos_columns and any of image_column, prompt_column"):
        IQADataModule(source="table", source_options={"image_colum": "file", "mos_columns": {"quality": "score"}})


def test_an_official_release_given_source_options_says_it_takes_none(tmp_path):
    data = IQADataModule(source="agiqa-3k", root=str(make_agiqa3k(tmp_path)), source_options=MAPPING)
    with pytest.raises(OptionError) as info:
        data.load_table()
    assert str(info.value) == (
        "data.source agiqa-3k reads its release's own files and takes no data.source_options (they map the columns "
        "of a table or hf source); remove them"
    )


def test_a_checkpoint_of_a_mapping_given_in_part_resumes_a_run_of_the_same_mapping():
    from mst_clipiqa.training.checkpoints import _differences

    # Checkpoints of earlier versions stored only the fields a user gave; a run now holds every field.
    given = {"source_options": {"mos_columns": {"quality": "MOS"}}}
    saved = {"hyper_parameters": {"net": {}}, "datamodule_hyper_parameters": given}
    same = asdict(Columns(mos_columns={"quality": "MOS"}))
    assert _differences(saved, {}, {"source_options": same}) == []
    other = asdict(Columns(mos_columns={"quality": "MOS"}, prompt_column="prompt"))
    assert _differences(saved, {}, {"source_options": other}) == ["data.source_options"]
    unknown = {"hyper_parameters": {"net": {}}, "datamodule_hyper_parameters": {"source_options": {"old_key": 1}}}
    assert _differences(unknown, {}, {"source_options": same}) == ["data.source_options"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"test_source": "table"}, "data.test_source 'table' is not an official release: one of agiqa-1k"),
        ({"test_source": "agiqa-1k"}, "data.test_source agiqa-1k needs data.test_root"),
    ],
)
def test_a_test_source_must_be_a_release_with_its_folder(options, message, tmp_path):
    with pytest.raises(OptionError, match=message):
        IQADataModule(source="agiqa-3k", root=str(make_agiqa3k(tmp_path)), **options)
