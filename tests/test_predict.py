"""In-house data → fine-tune → predict, as a user walks it: `predict` writes one row per image, in row order, on one
process or two; a team's table trains with the documented config; a saved model fine-tunes on data of another MOS
scale with nothing but `--model.init_from` and the data options, and predicts on that scale."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from data.release_fixtures import AIGIQA20K_TEST, AIGIQA20K_VAL, make_aigiqa20k
from scripts.runs import TEST_ROWS, cli_args, in_process, launch

from mst_clipiqa.cli.commands import main
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.data.preprocess import ClipPreprocess
from mst_clipiqa.errors import BadRowError, OptionError
from mst_clipiqa.hub.pretrained import SavedModel, save_pretrained
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.scoring.predictions import PredictionWriter, merge_shards
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

ROOT = Path(__file__).parents[1]
INHOUSE = str(ROOT / "experiments" / "inhouse_table.yaml")
README = (ROOT / "README.md").read_text()
COLUMNS = ["name", "prompt", "score", "mos", "coarse_share"]
QUIET = ("--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def written(output: str) -> Path:
    """The file a run says it wrote its predictions to."""
    match = re.search(r"Predictions of \d+ images written to (\S+)", output)
    assert match, output[-3000:]
    return Path(match.group(1))


def prediction_file(cli) -> Path:
    """The file a run in this process wrote its predictions to."""
    (writer,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, PredictionWriter)]
    return writer.written


@pytest.fixture(scope="module")
def trained(tiny_clip, demo_data, tmp_path_factory) -> dict:
    """A 2-epoch fit of the demo (template head), its last checkpoint and the model exported from it."""
    run_dir = tmp_path_factory.mktemp("fit") / "run"
    cli = in_process("fit", cli_args(demo_data, tiny_clip, run_dir, epochs=2))
    checkpoint = Path(cli.trainer.checkpoint_callback.last_model_path)
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(run_dir.parent / "demo-model")])
    return {"run_dir": run_dir, "checkpoint": checkpoint, "model": run_dir.parent / "demo-model"}


@pytest.fixture(scope="module")
def one_process(trained, tiny_clip, demo_data) -> Path:
    """`mst-clipiqa predict` of the test rows by one process, into the default place; the file it wrote."""
    args = cli_args(demo_data, tiny_clip, trained["run_dir"], "--ckpt_path", str(trained["checkpoint"]))
    return prediction_file(in_process("predict", args))


@pytest.fixture(scope="module")
def inhouse_table(demo_data, tmp_path_factory) -> Path:
    """A team's table: file, prompt, score on 0-10 and a second MOS column; the images next to it."""
    folder = tmp_path_factory.mktemp("inhouse")
    shutil.copytree(Path(demo_data) / "images", folder / "images")
    table = folder / "annotations.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["file", "prompt", "score", "align_score"])
        for row in read_csv(Path(demo_data) / "data.csv"):
            score, align = 2 * float(row["mos_quality"]), 2 * float(row["mos_align"])
            out.writerow([f"images/{row['name']}", row["prompt"], f"{score:.3f}", f"{align:.3f}"])
    return table


def inhouse_args(table: Path, demo_data: str, run_dir: Path, *extra: str) -> list[str]:
    """The documented command on `table`, in `run_dir`, on the CPU for 2 epochs; `extra` last."""
    return [
        "--config", INHOUSE, "--data.root", str(table), "--trainer.default_root_dir", str(run_dir),
        "--data.cache_dir", str(Path(demo_data).parent / "feature-cache"), "--trainer.max_epochs", "2", *QUIET, *extra,
    ]  # fmt: skip


# ---- predict ---------------------------------------------------------------------------------------------------


def test_predict_writes_one_row_per_test_image_into_its_own_run_folder(trained, one_process, demo_data):
    path = one_process
    assert path.name == "predictions.csv" and path.is_file()
    # In the run's log folder: under the run's root, not in the folder of the fit it read the checkpoint of.
    assert trained["run_dir"] in path.parents and trained["checkpoint"].parent.parent not in path.parents
    rows = read_csv(path)
    assert list(rows[0]) == COLUMNS and len(rows) == TEST_ROWS
    # Row order: the test rows as the run's splits.json lists them (in table order).
    test_names = json.loads((path.parent / "splits.json").read_text())["splits"][0]["test"]
    assert [row["name"] for row in rows] == test_names
    table = {row["name"]: row for row in read_csv(Path(demo_data) / "data.csv")}
    low, high = SavedModel.read(trained["checkpoint"]).mos_range
    for row in rows:
        expected = table[row["name"]]
        assert row["prompt"] == expected["prompt"] and float(row["mos"]) == float(expected["mos_quality"])
        assert low <= float(row["score"]) <= high and 0 < float(row["coarse_share"]) < 1
    assert not list(path.parent.glob("*.parts"))


def test_two_ddp_ranks_write_the_same_file_as_one_process(trained, one_process, tiny_clip, demo_data, tmp_path):
    out = tmp_path / "ddp" / "predictions.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = cli_args(demo_data, tiny_clip, tmp_path / "run", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                    "--ckpt_path", str(trained["checkpoint"]), "--predictions_path", str(out))  # fmt: skip
    output = launch([*torchrun, "-m", "mst_clipiqa", "predict", *args])
    assert written(output) == out and output.count("Predictions of") == 1  # rank 0 merges and says so
    two = [json.loads(line) for line in out.read_text().splitlines()]
    expected = read_csv(one_process)
    assert [row["name"] for row in two] == [row["name"] for row in expected]  # each image once, in row order
    assert all(list(row) == COLUMNS for row in two)
    for got, want in zip(two, expected):
        assert got["prompt"] == want["prompt"] and got["mos"] == float(want["mos"])
        assert got["score"] == pytest.approx(float(want["score"]), abs=1e-6)
        assert got["coarse_share"] == pytest.approx(float(want["coarse_share"]), abs=1e-6)
    assert not (out.parent / "predictions.jsonl.parts").exists()


def test_unlabeled_official_test_set_gives_a_file_ready_to_submit(trained, tmp_path):
    root = make_aigiqa20k(tmp_path / "AIGIQA-20K")
    out = tmp_path / "submission.parquet"
    cli = in_process("predict", [
        "--config", str(ROOT / "experiments" / "aigiqa20k_template.yaml"), "--data.root", str(root),
        "--ckpt_path", str(trained["checkpoint"]), "--predictions_path", str(out),
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.num_workers", "0", *QUIET,
    ])  # fmt: skip
    assert prediction_file(cli) == out
    rows = pq.read_table(out).to_pylist()
    assert [list(row) for row in rows] == [["name", "prompt", "score"]] * 3
    assert [(row["name"], row["prompt"]) for row in rows] == [*AIGIQA20K_VAL, *AIGIQA20K_TEST]  # table order
    low, high = SavedModel.read(trained["checkpoint"]).mos_range
    assert all(low <= row["score"] <= high for row in rows)


def test_a_path_of_unknown_format_is_refused_by_name():
    with pytest.raises(OptionError, match=r"predictions_path 'scores.txt'.*\.csv, \.jsonl, \.parquet"):
        PredictionWriter("scores.txt")


def test_merge_refuses_a_row_predicted_twice_and_a_missing_shard(tmp_path):
    out = tmp_path / "predictions.csv"
    parts = tmp_path / "predictions.csv.parts"
    parts.mkdir()
    # How torch's padding DistributedSampler deals 3 rows to 2 ranks: rank 1 gets row 0 again.
    for rank, rows in enumerate([[0, 2], [1, 0]]):
        lines = [json.dumps({"index": i, "score": 1.0}) + "\n" for i in rows]
        (parts / f"rank{rank:05d}.jsonl").write_text("".join(lines))
    with pytest.raises(RuntimeError, match="not in increasing index order|predicted twice"):
        merge_shards(out, 2)
    (parts / "rank00001.jsonl").write_text(json.dumps({"index": 0, "score": 1.0}) + "\n")
    with pytest.raises(RuntimeError, match="row 0 was predicted twice"):
        merge_shards(out, 2)
    with pytest.raises(FileNotFoundError, match="rank00002.jsonl.*file system every node sees"):
        merge_shards(out, 3)
    assert not out.exists()


# ---- a team's table, fine-tuning -------------------------------------------------------------------------------


def test_a_table_with_file_prompt_and_score_trains_with_the_documented_command(
    inhouse_table, tiny_clip, demo_data, tmp_path
):
    encoders = ("--model.net.coarse_encoder", tiny_clip[0], "--model.net.fine_encoder", tiny_clip[1])
    cli = in_process("fit", inhouse_args(inhouse_table, demo_data, tmp_path / "run", *encoders))
    trainer, data = cli.trainer, cli.datamodule
    assert trainer.global_step > 0 and math.isfinite(trainer.callback_metrics["train/loss"])
    assert Path(trainer.checkpoint_callback.last_model_path).is_file()
    assert cli.model.net_config.variant == "template" and not data.model_settings.need_prompt
    scores = [float(row["score"]) for row in read_csv(inhouse_table)]
    train_scores = [scores[row] for row in data.split.train]  # no data.mos_range: the training split's min and max
    assert cli.model.net.mos_range.tolist() == [min(train_scores), max(train_scores)]

    # The README shows this table's columns, the config's mapping of them, and this command.
    section = README.split("## Fine-tuning on your own data")[1]
    example = re.search(r"```csv\n(.*?)\n", section).group(1)
    mapping = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1))["data"]
    assert example.split(",") == list(read_csv(inhouse_table)[0])
    assert mapping["source_options"] == yaml.safe_load(Path(INHOUSE).read_text())["data"]["source_options"]
    assert f"mst-clipiqa fit --config experiments/inhouse_table.yaml --data.root {mapping['root']}\n" in section


def test_fine_tuning_on_another_scale_takes_the_saved_network_and_predicts_on_the_new_scale(
    trained, inhouse_table, demo_data, tmp_path
):
    saved = SavedModel.read(trained["model"])
    old_low, old_high = saved.mos_range
    assert old_high < 5  # the demo's 0-5 MOS; the table's scores run to 10
    args = inhouse_args(inhouse_table, demo_data, tmp_path / "run", "--model.init_from", str(trained["model"]),
                        "--data.mos_range", "[0, 10]")  # fmt: skip
    cli = in_process("fit", args)
    module, data = cli.model, cli.datamodule
    # The saved encoders, head and its settings: the config's hub ids are at their defaults, so they give way.
    assert module.net_config == saved.net and module.hparams["net"]["coarse_encoder"] == saved.net.coarse_encoder
    assert data.model_settings.preprocess_from == saved.net.coarse_encoder and not data.model_settings.need_prompt
    assert module.net.mos_range.tolist() == [0.0, 10.0]

    checkpoint = cli.trainer.checkpoint_callback.last_model_path
    predict = in_process("predict", inhouse_args(inhouse_table, demo_data, tmp_path / "run", "--ckpt_path", checkpoint))
    rows = read_csv(prediction_file(predict))
    assert len(rows) == len(data.split.test) and list(rows[0]) == COLUMNS
    scores, mos = [float(row["score"]) for row in rows], [float(row["mos"]) for row in rows]
    assert all(0 <= score <= 10 for score in scores) and max(scores) > old_high  # out of reach on the old scale
    assert abs(sum(scores) / len(scores) - sum(mos) / len(mos)) < 2.5


def test_a_saved_prompt_head_brings_its_variant_to_the_data(inhouse_table, tiny_clip, demo_data, tmp_path):
    module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], variant="prompt"))
    module.net.set_mos_range(1.0, 5.0)
    folder = save_pretrained(module, tmp_path / "prompt-model")
    args = inhouse_args(inhouse_table, demo_data, tmp_path / "run", "--model.init_from", str(folder),
                        "--trainer.max_epochs", "1")  # fmt: skip
    # The table's prompts are not mapped: the prompt head, taken from the saved model, asks the data for them.
    with pytest.raises(BadRowError, match="none of its .* images has a prompt.*--data.source_options.prompt_column"):
        in_process("fit", args)
    cli = in_process("fit", [*args, "--data.source_options.prompt_column", "prompt"])
    assert cli.model.net_config.variant == "prompt" and cli.datamodule.model_settings.need_prompt
    assert cli.trainer.global_step > 0


def test_a_data_module_without_a_trainer_follows_the_model_it_is_given(tiny_clip, demo_data):
    data = IQADataModule(source="agiqa-3k", root=demo_data, features=False, num_workers=0, batch_size=4)
    net = ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], variant="prompt", draft_decode=True)
    data.follow(MSTCLIPIQAModule(net=net))
    settings = data.model_settings
    assert (settings.need_prompt, settings.preprocess_from, settings.draft_decode) == (
        True, tiny_clip[0], True)  # fmt: skip
    data.setup("fit")  # the default preprocess_from, a hub id, would not load offline
    assert data.preprocess == ClipPreprocess.from_pretrained(tiny_clip[0])
    assert next(iter(data.train_dataloader()))["pixel_values"].shape[0] == 4
    with pytest.raises(RuntimeError, match="before setup"):
        data.follow(replace(net, variant="template"))
    data.follow(net)  # the same settings again: nothing to replace
    with pytest.raises(TypeError, match="ModelConfig"):
        IQADataModule().follow(tiny_clip[0])
