"""W&B logging, offline: a short fit + test through the CLI with experiments/wandb.yaml, checked in the run's files,
and a user's runs in one folder (killed, resumed, fitted afresh, tested) as separate commands.

The offline runs are read back with wandb's own reader of their transaction logs (`wandb leet inspect`) and from
the files under files/media.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from scripts.ranks import UNEVEN_COUNTS, gathered_uneven_rows, run_ranks
from scripts.runs import STEPS_PER_EPOCH, cli_args, in_process, standing_still, subprocess_env, wait_for

from mst_clipiqa.training.callbacks import WandbEvaluationLogger
from mst_clipiqa.training.checkpoints import read_checkpoint

WANDB_CONFIG = Path(__file__).parents[1] / "experiments" / "wandb.yaml"


def inspect(run_dir: Path, *options: str) -> str:
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *options, str(run_dir)]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout


@pytest.fixture(scope="module")
def run(tiny_clip, demo_data, tmp_path_factory):
    """Fit 2 epochs and test on the demo data, logging to an offline W&B run; what the run holds on disk."""
    import wandb

    from mst_clipiqa.cli.trainer import MSTCLIPIQACLI
    from mst_clipiqa.demo.run import DEMO_CONFIG

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
    with ThreadPoolExecutor(2) as pool:  # two processes at once: each spends most of its time importing wandb
        transactions, summary = pool.map(lambda options: inspect(run_dir, *options), [(), ("--summary",)])
    records = [json.loads(line) for line in transactions.splitlines()]
    data = cli.datamodule
    return SimpleNamespace(
        dir=run_dir,
        state=json.loads(summary),
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


@pytest.mark.parametrize("stage", ["val", "test"])
def test_the_offline_run_folder_holds_the_thumbnails(run, stage):
    # wandb stages a table's images outside the run folder (WANDB_DATA_DIR); the captioned images are the run's own.
    logged = [item for item in run.history if f"{stage}/worst_images.filenames" in item]
    assert len(logged) == (2 if stage == "val" else 1)  # each evaluation
    names = {run.table[i]["name"] for i in run.rows[stage]}
    for item in logged:
        files = item[f"{stage}/worst_images.filenames"]
        assert len(files) == 4 and all((run.dir / "files" / file).stat().st_size > 0 for file in files)
        assert {caption.split(":")[0] for caption in item[f"{stage}/worst_images.captions"]} <= names
    # ... and among the files `wandb sync` uploads.
    uploads = {file["path"] for r in run.records if r["type"] == "files" for file in r["files"]["files"]}
    assert {file for item in logged for file in item[f"{stage}/worst_images.filenames"]} <= uploads


def test_checkpoints_become_model_artifacts(run):
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert models and all(c["path"] == "model.ckpt" for a in models for c in a["manifest"]["contents"])


# ---- a user's runs in one folder --------------------------------------------------------------------------------


def offline_runs(root: Path) -> dict[str, list[SimpleNamespace]]:
    """The offline W&B runs under `root` by run id, each part (a folder of wandb's) oldest first.

    The id is taken from the folder's name, offline-run-<time>-<id>: a killed process can leave a log without records.
    """
    runs: dict[str, list[SimpleNamespace]] = {}
    folders = sorted((root / "wandb").glob("offline-run-*"))
    with ThreadPoolExecutor(2) as pool:  # two at a time: each process spends most of its time importing wandb
        read = list(pool.map(inspect, folders))
    for folder, transactions in zip(folders, read):
        records = [json.loads(line) for line in transactions.splitlines()]
        resumed = any(r["run"].get("resume") for r in records if r["type"] == "run")
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        runs.setdefault(folder.name.split("-")[3], []).append(SimpleNamespace(resumed=resumed, history=history))
    return runs


@contextmanager
def lightning_says() -> Iterator[list[str]]:
    """The messages Lightning's loggers (and this package's, through them) give the user meanwhile."""
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield said
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def journey(tiny_clip, demo_data, tmp_path_factory):
    """In one folder, as a user's separate commands: a fit killed in its second epoch, the same command again with
    ``--ckpt_path last``, a fresh fit, and a test of the first run's last checkpoint; what each left on disk."""
    import wandb

    root = tmp_path_factory.mktemp("journey")
    folders = ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")  # not the user's home
    wandb_env = {"WANDB_SILENT": "true", **{name: str(root / name.lower()) for name in folders}}
    args = cli_args(demo_data, tiny_clip, root, "--config", str(WANDB_CONFIG), "--trainer.logger.init_args.save_dir",
                    str(root), epochs=2)  # fmt: skip
    runs = root / "mst-clipiqa"  # <save_dir>/<project>/<run id>

    def files() -> dict[Path, bytes]:
        return {path: path.read_bytes() for path in root.rglob("*") if path.name in ("config.yaml", "splits.json")}

    def command(subcommand: str, *extra: str) -> list[str]:
        """The CLI in this process, as a command of its own (its W&B run ends with it); what it said."""
        with pytest.MonkeyPatch.context() as env, lightning_says() as said:
            for name, value in wandb_env.items():
                env.setenv(name, value)
            in_process(subcommand, [*args, *extra])
            wandb.finish()
        return said

    marker, log = root / "standing-still", root / "killed.log"
    with standing_still(marker, STEPS_PER_EPOCH + 1, args, subprocess_env(**wandb_env), log) as process:
        wait_for(marker.exists, process, log)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    (killed,) = [path.parents[1] for path in runs.glob("*/checkpoints/last.ckpt")]
    killed_files = files()
    resumed_said = command("fit", "--ckpt_path", "last")
    resumed_files = files()
    command("fit", "--trainer.max_epochs", "1")
    (fresh,) = [path.parents[1] for path in runs.glob("*/checkpoints/last.ckpt") if path.parents[1] != killed]
    fresh_files = files()
    tested_checkpoint = killed / "checkpoints" / "last.ckpt"
    test_said = command("test", "--ckpt_path", str(tested_checkpoint))
    (tested,) = [path for path in runs.iterdir() if path not in (killed, fresh)]
    return SimpleNamespace(
        root=root, killed=killed, fresh=fresh, tested=tested, tested_checkpoint=tested_checkpoint,
        files=[killed_files, resumed_files, fresh_files, files()], resumed_said="\n".join(resumed_said),
        test_said="\n".join(test_said), wandb=offline_runs(root),
    )  # fmt: skip


def test_a_killed_fit_resumed_with_ckpt_path_last_continues_its_wandb_run(journey):
    run_id = journey.killed.name
    killed, resumed = journey.wandb[run_id]  # two folders of wandb's, one run for `wandb sync`
    assert not killed.resumed and resumed.resumed
    assert f"Resuming: W&B run {run_id} continues" in journey.resumed_said
    # The resumed part starts at the step after the checkpoint of epoch 0 and ends where an uninterrupted run would.
    # (The killed part holds what wandb had flushed to disk when the kill came, possibly nothing.)
    steps = [item["trainer/global_step"] for item in resumed.history if "trainer/global_step" in item]
    assert min(steps) == STEPS_PER_EPOCH and max(steps) == 2 * STEPS_PER_EPOCH
    assert all(item["trainer/global_step"] <= STEPS_PER_EPOCH + 1 for item in killed.history)
    assert [item["epoch"] for item in resumed.history if "val/srcc" in item] == [1]
    # Its rows are numbered (W&B's _step) on from the killed part's at the checkpoint, as they would be online:
    # `wandb sync` uploads them after the killed part's rows instead of over them (epoch 0 logged at least 2 rows).
    numbers = [item["_step"] for item in resumed.history]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and numbers[0] >= 2
    last = read_checkpoint(journey.killed / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 * STEPS_PER_EPOCH


def test_a_fresh_fit_starts_a_new_wandb_run_in_a_new_folder(journey):
    (fresh,) = journey.wandb[journey.fresh.name]
    assert not fresh.resumed and journey.fresh.name != journey.killed.name
    assert set(journey.wandb) == {journey.killed.name, journey.fresh.name, journey.tested.name}


def test_every_run_keeps_its_own_config_and_splits_and_none_is_overwritten(journey):
    killed, resumed, fresh, tested = journey.files
    for run in (journey.killed, journey.fresh, journey.tested):
        assert {run / "config.yaml", run / "splits.json"} <= set(tested)
    assert set(tested) == {run / name for run in (journey.killed, journey.fresh, journey.tested)
                           for name in ("config.yaml", "splits.json")}  # fmt: skip
    # The resumed fit rewrote its own run's config (with its --ckpt_path), in its own folder, without failing.
    assert set(killed) == set(resumed)
    assert yaml.safe_load(resumed[journey.killed / "config.yaml"])["ckpt_path"] == "last"
    # Neither the fresh fit nor the test changed any file of an earlier run.
    assert {path: fresh[path] for path in resumed} == resumed
    assert {path: tested[path] for path in fresh} == fresh


def test_test_writes_its_own_config_and_resumes_nothing(journey):
    config = yaml.safe_load((journey.tested / "config.yaml").read_text())
    assert config["ckpt_path"] == str(journey.tested_checkpoint)
    assert not (journey.tested / "checkpoints").exists()
    assert "Resuming" not in journey.test_said
    (test_run,) = journey.wandb[journey.tested.name]
    assert not test_run.resumed and any("test/srcc" in item for item in test_run.history)


def test_without_a_wandb_logger_the_callback_does_nothing(tmp_path):
    callback = WandbEvaluationLogger()
    trainer = SimpleNamespace(loggers=[CSVLogger(tmp_path)], sanity_checking=False, is_global_zero=True)
    outputs = {"index": torch.arange(2), "score": torch.ones(2), "mos": torch.zeros(2), "coarse_share": torch.ones(2)}
    callback.on_validation_batch_end(trainer, None, outputs, None, 0)
    assert callback._rows == []
    callback.on_validation_epoch_end(trainer, None)  # no gather, no W&B import, no error


@pytest.mark.usefixtures("rank_server_beside")
def test_gather_rows_joins_uneven_ranks_exactly_once(tmp_path):
    run_ranks(gathered_uneven_rows, (str(tmp_path / "init"), str(tmp_path / "out.pt")), 2)
    results = torch.load(tmp_path / "out.pt")
    for (n0, n1), gathered in zip(UNEVEN_COUNTS, results):
        expected = torch.cat([
            torch.arange(n0 * 4, dtype=torch.float64).reshape(-1, 4),
            torch.arange(n1 * 4, dtype=torch.float64).reshape(-1, 4) + 100,
        ])
        assert torch.equal(gathered, expected)
