"""Faults during fit, with real processes and real signals, and each run's own folder.

A SIGKILL mid-epoch, then `fit --ckpt_path last`, ends exactly where an uninterrupted run ends, in the same run
folder. Under SLURM, SIGUSR1 saves a checkpoint and requeues the job, and the requeued run resumes from that
checkpoint. `test` and `predict` from a checkpoint resume nothing and keep their files apart from the fit's.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from scripts.runs import (
    STEPS_PER_EPOCH,
    cli_args,
    in_process,
    logged_metrics,
    one_thread,
    standing_still,
    subprocess_env,
    wait_for,
)

from mst_clipiqa.training.checkpoints import find_last_checkpoint, read_checkpoint

EPOCHS = 3


def fit_and_test(args: list[str]) -> dict:
    """`fit` with the CLI in this process, then test its best checkpoint; returns what a comparison needs.

    It computes on one thread, as the killed runs do (`subprocess_env`): float sums taken over another number of
    threads differ in the last bits, which a resumed run would carry on from.
    """
    with one_thread():
        return _fit_and_test(args)


def _fit_and_test(args: list[str]) -> dict:
    cli = in_process("fit", args)
    trainer = cli.trainer
    val = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
    best, last = Path(trainer.checkpoint_callback.best_model_path), trainer.checkpoint_callback.last_model_path
    dirpath, resumed_from = trainer.checkpoint_callback.dirpath, trainer.ckpt_path
    (test,) = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    return {
        "val": val,
        "test": test,
        "best": best.name,
        "last": read_checkpoint(last),
        "last_path": Path(last),
        "dirpath": dirpath,
        "resumed_from": resumed_from,
        "trainer": trainer,
    }


def assert_same_run(got: dict, want: dict) -> None:
    assert got["val"] == pytest.approx(want["val"], abs=1e-4) and len(got["val"]) >= 5
    assert got["test"] == pytest.approx(want["test"], abs=1e-4) and "test/srcc" in got["test"]
    assert got["best"] == want["best"]
    a, b = got["last"], want["last"]
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (EPOCHS - 1, EPOCHS * STEPS_PER_EPOCH)
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    moments, resumed_moments = b["optimizer_states"][0]["state"], a["optimizer_states"][0]["state"]
    assert moments.keys() == resumed_moments.keys()
    for key, state in moments.items():
        for name, value in state.items():
            torch.testing.assert_close(resumed_moments[key][name], value, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_clip, demo_data, tmp_path_factory) -> dict:
    return fit_and_test(cli_args(demo_data, tiny_clip, tmp_path_factory.mktemp("uninterrupted") / "run", epochs=EPOCHS))


# What srun sets for a one-node, one-task job (a job named "bash" or "interactive" would not count as SLURM).
SLURM = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mst-clipiqa", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
}  # fmt: skip


@pytest.fixture(scope="module")
def standing(tiny_clip, demo_data, tmp_path_factory) -> Iterator[dict[str, SimpleNamespace]]:
    """The two runs the fault tests stop, started together so that they start up at once: each stands still one
    step into epoch 1 (last.ckpt holds the end of epoch 0, and the step after it is lost with the process) until its
    test signals it; killed, if still running, after the module's tests.

    "sigkill" is a plain fit. "slurm" runs as the sbatch script of docs/CLUSTER.md runs it, the first time and after
    every requeue (``--ckpt_path last``), under SLURM's variables and with an `scontrol` that records its arguments.
    """
    sigkill, slurm = tmp_path_factory.mktemp("sigkill"), tmp_path_factory.mktemp("slurm")
    requeued, scontrol = slurm / "scontrol.log", slurm / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{requeued}"\n')
    scontrol.chmod(0o755)
    slurm_env = {**SLURM, "PATH": f"{scontrol.parent}:{subprocess_env()['PATH']}"}
    runs = {
        "sigkill": SimpleNamespace(dir=sigkill / "run", env={}),
        "slurm": SimpleNamespace(dir=slurm / "run", env=slurm_env, requeued=requeued),
    }
    runs["sigkill"].args = cli_args(demo_data, tiny_clip, sigkill / "run", epochs=EPOCHS)
    runs["slurm"].args = cli_args(demo_data, tiny_clip, slurm / "run", "--ckpt_path", "last", epochs=EPOCHS)
    with ExitStack() as stack:
        for run in runs.values():
            run.marker, run.log = run.dir.parent / "standing-still", run.dir.parent / "run.log"
            env = subprocess_env(**run.env)
            run.process = stack.enter_context(standing_still(run.marker, STEPS_PER_EPOCH + 1, run.args, env, run.log))
        yield runs


def test_sigkill_mid_epoch_then_fit_ckpt_path_last_ends_like_an_uninterrupted_run(standing, request):
    run = standing["sigkill"]
    run_dir, args, process = run.dir, run.args, run.process
    uninterrupted = request.getfixturevalue("uninterrupted")  # fitted here while the runs start
    wait_for(run.marker.exists, process, run.log)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    (last,) = run_dir.rglob("last.ckpt")
    assert read_checkpoint(last)["global_step"] == STEPS_PER_EPOCH

    resumed = fit_and_test([*args, "--ckpt_path", "last"])

    assert resumed["resumed_from"] == str(last)
    assert_same_run(resumed, uninterrupted)
    # Checkpoints went on in the first run's folder, so the best-k bookkeeping survived the kill ...
    assert Path(resumed["dirpath"]) == last.parent
    # ... and so did the run's config (rewritten by the resumed command, which did not fail on it), splits and
    # metrics: no second version folder.
    assert_files_in_one_run_folder(run_dir, last.parents[1])


def test_a_csv_logged_fit_resumed_with_ckpt_path_last_logs_on_in_its_folder_as_one_run(
    uninterrupted, tiny_clip, demo_data, tmp_path
):
    args = cli_args(demo_data, tiny_clip, tmp_path / "run", epochs=EPOCHS - 1)
    folder = tmp_path / "run" / "lightning_logs" / "version_0"
    with one_thread():
        in_process("fit", args)
        first = logged_metrics(folder)
        resumed = in_process("fit", [*args, "--trainer.max_epochs", str(EPOCHS), "--ckpt_path", "last"])
    assert Path(resumed.trainer.log_dir) == folder
    assert_files_in_one_run_folder(tmp_path / "run", folder)
    got = logged_metrics(folder)
    assert got[: len(first)] == first and {row["epoch"] for row in got[len(first) :]} == {EPOCHS - 1}
    want = [row for row in logged_metrics(uninterrupted["last_path"].parents[1]) if "test/srcc" not in row]
    assert [(row["epoch"], row["step"], row.keys()) for row in got] == [
        (row["epoch"], row["step"], row.keys()) for row in want
    ]


def test_a_tensorboard_logged_fit_resumed_with_ckpt_path_last_logs_on_in_its_folder(tiny_clip, demo_data, tmp_path):
    tensorboard = ["--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger"]
    args = cli_args(demo_data, tiny_clip, tmp_path / "run", *tensorboard, epochs=1)
    folder = tmp_path / "run" / "lightning_logs" / "version_0"
    with one_thread():
        in_process("fit", args)
        first = sorted(folder.glob("events.out.tfevents.*"))
        resumed = in_process("fit", [*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert first and Path(resumed.trainer.log_dir) == folder
    assert_files_in_one_run_folder(tmp_path / "run", folder)
    # The resumed part's events beside the first part's: TensorBoard shows them as one run.
    assert set(first) < set(folder.glob("events.out.tfevents.*"))


def test_ckpt_path_last_takes_the_newest_readable_checkpoint_of_the_same_network_and_split(uninterrupted):
    trainer, last = uninterrupted["trainer"], uninterrupted["last_path"]
    net, data = trainer.lightning_module.hparams["net"], dict(trainer.datamodule.hparams)
    assert find_last_checkpoint(trainer, net, data) == last
    with pytest.warns(UserWarning, match=r"another run \(differs in data.split_index\)"):
        assert find_last_checkpoint(trainer, net, {**data, "split_index": 1}) is None
    with pytest.warns(UserWarning, match=r"another run \(differs in model.net\)"):
        assert find_last_checkpoint(trainer, {**net, "variant": "prompt"}, data) is None
    # A newer last checkpoint cut short, as a copy across file systems killed midway leaves it.
    newer = last.with_name("last-v1.ckpt")
    newer.write_bytes(last.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=f"skipped newer checkpoints:\n  {newer} is not a readable checkpoint"):
        assert find_last_checkpoint(trainer, net, data) == last


def test_sigusr1_under_slurm_saves_and_requeues_and_the_rerun_resumes_from_it(standing, monkeypatch):
    run = standing["slurm"]
    run_dir, args, process, requeued, slurm = run.dir, run.args, run.process, run.requeued, run.env
    wait_for(run.marker.exists, process, run.log)
    process.send_signal(signal.SIGUSR1)
    wait_for(requeued.exists, process, run.log)  # scontrol runs once the checkpoint is written
    process.kill()  # as SLURM kills a requeued job
    process.wait(timeout=60)

    assert requeued.read_text().split() == ["requeue", "4242"]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert read_checkpoint(hpc)["global_step"] == STEPS_PER_EPOCH + 1

    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    with pytest.warns(UserWarning, match="resuming from a checkpoint that ended before the epoch ended"):
        cli = in_process("fit", args)
    assert isinstance(cli.trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert cli.trainer.ckpt_path == str(hpc)
    assert cli.trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    assert Path(cli.trainer.log_dir) == run_dir / "lightning_logs" / "version_0"
    # The killed part's CSV writer may not have flushed its rows: the resumed part's are all there, once.
    resumed_epochs = [row["epoch"] for row in logged_metrics(Path(cli.trainer.log_dir)) if "val/srcc" in row]
    assert resumed_epochs[-(EPOCHS - 1) :] == list(range(1, EPOCHS)) and len(set(resumed_epochs)) == len(resumed_epochs)
    assert_files_in_one_run_folder(run_dir, run_dir / "lightning_logs" / "version_0")


def assert_files_in_one_run_folder(root: Path, folder: Path) -> None:
    """`folder` holds the run's config.yaml (the resumed command's: ``--ckpt_path last``), splits.json and metrics, and
    no other folder under `root` holds any."""
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]
    assert sorted(root.rglob("config.yaml")) == [folder / "config.yaml"]
    assert sorted(root.rglob("splits.json")) == [folder / "splits.json"]
    assert yaml.safe_load((folder / "config.yaml").read_text())["ckpt_path"] == "last"


# ---- each run's own folder ---------------------------------------------------------------------------------------


def test_test_and_predict_from_a_checkpoint_resume_nothing_and_keep_their_files_apart(
    uninterrupted, tiny_clip, demo_data, caplog
):
    fit_folder = uninterrupted["last_path"].parents[1]  # <root>/lightning_logs/version_0
    root = fit_folder.parents[1]
    fit_files = {path: path.read_bytes() for path in fit_folder.iterdir() if path.is_file()}
    best = fit_folder / "checkpoints" / uninterrupted["best"]
    args = cli_args(demo_data, tiny_clip, root, "--ckpt_path", str(best), epochs=EPOCHS)
    with caplog.at_level(logging.INFO):
        tested = in_process("test", args)
        predicted = in_process("predict", args)
    assert "Resuming" not in caplog.text
    folders = [Path(cli.trainer.log_dir) for cli in (tested, predicted)]
    assert len({fit_folder, *folders}) == 3
    for folder, command in zip(folders, ("test", "predict")):
        assert yaml.safe_load((folder / "config.yaml").read_text())["ckpt_path"] == str(best), command
        assert (folder / "splits.json").read_bytes() == fit_files[fit_folder / "splits.json"], command
        assert not (folder / "checkpoints").exists(), command
    for cli, folder in zip((tested, predicted), folders):  # the fit's checkpoint folder was not taken over
        assert Path(cli.trainer.checkpoint_callback.dirpath).parent == folder
    assert {path: path.read_bytes() for path in fit_folder.iterdir() if path.is_file()} == fit_files


def test_runs_without_a_logger_share_a_folder_without_overwriting_each_other(tiny_clip, demo_data, tmp_path):
    args = cli_args(demo_data, tiny_clip, tmp_path, "--trainer.logger", "false", epochs=1)
    in_process("fit", args)
    first = {path: path.read_bytes() for path in (tmp_path / "config.yaml", tmp_path / "splits.json")}
    in_process("fit", [*args, "--data.split_index", "1"])
    assert {path: path.read_bytes() for path in first} == first
    # As Lightning names a second run's checkpoints in a shared folder.
    assert yaml.safe_load((tmp_path / "config-v1.yaml").read_text())["data"]["split_index"] == 1
    assert (tmp_path / "splits-v1.json").read_bytes() == first[tmp_path / "splits.json"]
