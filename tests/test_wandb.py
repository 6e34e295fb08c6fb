"""W&B logging, offline: a short fit + test through the CLI with experiments/wandb.yaml, checked in the run's files.

The offline run is read back with wandb's own reader of its transaction log (`wandb leet inspect`) and from the
table files under files/media/table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.loggers import CSVLogger

from mst_clipiqa.callbacks import WandbEvaluationLogger, gather_rows

WANDB_CONFIG = Path(__file__).parents[1] / "experiments" / "wandb.yaml"


def inspect(run_dir: Path, *options: str) -> str:
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *options, str(run_dir)]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout


@pytest.fixture(scope="module")
def run(tiny_clip, demo_data, tmp_path_factory):
    """Fit 2 epochs and test on the demo data, logging to an offline W&B run; what the run holds on disk."""
    import wandb

    from mst_clipiqa.demo import DEMO_CONFIG

    # Imported here, not above: the DDP test's worker processes import this file and need none of it.
    from mst_clipiqa.trainer_cli import MSTCLIPIQACLI

    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # not the user's home
            env.setenv(name, str(root / name.lower()))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        args = [
            "fit", "--config", str(DEMO_CONFIG), "--config", str(WANDB_CONFIG),
            "--data.root", demo_data,
            "--model.net.coarse_encoder", tiny_clip[0], "--model.net.fine_encoder", tiny_clip[1],
            "--trainer.default_root_dir", str(root / "runs"), "--trainer.logger.init_args.save_dir", str(root / "runs"),
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--wandb_eval.worst_k", "4",
        ]  # fmt: skip
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = MSTCLIPIQACLI(args=args)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
        wandb.finish()
    (run_dir,) = (root / "runs" / "wandb").glob("offline-run-*")
    records = [json.loads(line) for line in inspect(run_dir).splitlines()]
    data = cli.datamodule
    return SimpleNamespace(
        dir=run_dir,
        state=json.loads(inspect(run_dir, "--summary")),
        records=records,
        history=[r["history"]["item"] for r in records if r["type"] == "history"],
        artifacts=[r["artifact"] for r in records if r["type"] == "artifact"],
        table=data.load_table(),
        rows={"val": sorted(data.split.val), "test": sorted(data.split.test)},
    )


def media_table(run, key: str) -> dict:
    """A logged table's columns and rows, from the file its summary entry points at."""
    return json.loads((run.dir / "files" / run.state["summary"][key]["path"]).read_text())


def test_the_run_receives_the_whole_resolved_config(run, demo_data):
    config = run.state["config"]
    assert config["model"]["net"]["variant"] == "template" and config["model"]["optim"]["lr"] == 0.003
    assert config["data"]["root"] == demo_data and config["data"]["protocol"] == "prompt"
    assert config["trainer"]["max_epochs"] == 2 and config["seed_everything"] == 0
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert config["checkpoint"]["monitor"] == "val/srcc" and config["wandb_eval"]["worst_k"] == 4


def test_metrics_are_logged_each_evaluation(run):
    summary = run.state["summary"]
    for key in ("train/loss", "val/srcc", "val/plcc", "test/srcc", "test/plcc", "test/krcc", "test/rmse"):
        assert isinstance(summary[key], float), key
    assert sum("val/srcc" in item for item in run.history) == 2  # per epoch, sanity check not logged


@pytest.mark.parametrize("stage", ["val", "test"])
def test_scatter_covers_the_evaluation_set_exactly_once(run, stage):
    points = media_table(run, f"{stage}/pred_vs_mos_table")
    assert points["columns"] == ["index", "mos", "prediction"]
    index = [row[0] for row in points["data"]]
    assert index == run.rows[stage]
    mos = run.table.select(index)["mos_quality"]
    assert [row[1] for row in points["data"]] == pytest.approx(mos, rel=1e-6)
    key = f"_wandb.visualize.{stage}/pred_vs_mos"
    chart = next(r["config"]["update"][key] for r in run.records if key in r.get("config", {}).get("update", {}))
    assert chart["panel_config"]["panelDefId"] == "wandb/scatter/v0"


@pytest.mark.parametrize("stage", ["val", "test"])
def test_worst_predicted_images_are_tabled_with_thumbnails(run, stage):
    worst = media_table(run, f"{stage}/worst")
    assert worst["columns"] == ["image", "name", "prompt", "mos", "prediction", "abs_error", "index"]
    assert len(worst["data"]) == 4
    errors = [row[5] for row in worst["data"]]
    assert errors == sorted(errors, reverse=True)
    points = media_table(run, f"{stage}/pred_vs_mos_table")["data"]
    assert errors[0] == pytest.approx(max(abs(p - m) for _, m, p in points), rel=1e-6)
    for image, name, prompt, mos, prediction, error, index in worst["data"]:
        assert error == pytest.approx(abs(prediction - mos), rel=1e-6)
        assert (name, prompt) == (run.table[index]["name"], run.table[index]["prompt"])
        assert image is not None
    # The thumbnails travel in the table's artifact, the one the summary entry points at.
    client_id = run.state["summary"][f"{stage}/worst"]["artifact_path"].split("://")[1].split("/")[0]
    artifact = next(a for a in run.artifacts if a["client_id"] == client_id)
    assert sum(c["path"].startswith("media/images/") for c in artifact["manifest"]["contents"]) == 4


@pytest.mark.parametrize("stage", ["val", "test"])
def test_gate_statistics(run, stage):
    summary = run.state["summary"]
    assert 0.0 < summary[f"{stage}/coarse_share"] < 1.0
    histogram = summary[f"{stage}/coarse_share_hist"]
    assert histogram["_type"] == "histogram" and sum(histogram["values"]) == len(run.rows[stage])
    assert histogram["bins"][0] <= summary[f"{stage}/coarse_share"] <= histogram["bins"][-1]


def test_checkpoints_become_model_artifacts(run):
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert models and all(c["path"] == "model.ckpt" for a in models for c in a["manifest"]["contents"])


def test_without_a_wandb_logger_the_callback_does_nothing(tmp_path):
    callback = WandbEvaluationLogger()
    trainer = SimpleNamespace(loggers=[CSVLogger(tmp_path)], sanity_checking=False, is_global_zero=True)
    outputs = {"index": torch.arange(2), "score": torch.ones(2), "mos": torch.zeros(2), "coarse_share": torch.ones(2)}
    callback.on_validation_batch_end(trainer, None, outputs, None, 0)
    assert callback._rows == []
    callback.on_validation_epoch_end(trainer, None)  # no gather, no W&B import, no error


def gather_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = []
    for counts in ((3, 2), (2, 0), (0, 1)):  # uneven, as the unpadded evaluation sampler leaves them
        rows = torch.arange(counts[rank] * 4, dtype=torch.float64).reshape(-1, 4) + 100 * rank
        results.append(gather_rows(rows))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_gather_rows_joins_uneven_ranks_exactly_once(tmp_path):
    # Spawned: forking after the W&B run above can deadlock on locks its threads held.
    mp.spawn(gather_worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2)
    results = torch.load(tmp_path / "out.pt")
    for (n0, n1), gathered in zip(((3, 2), (2, 0), (0, 1)), results):
        expected = torch.cat([
            torch.arange(n0 * 4, dtype=torch.float64).reshape(-1, 4),
            torch.arange(n1 * 4, dtype=torch.float64).reshape(-1, 4) + 100,
        ])
        assert torch.equal(gathered, expected)
