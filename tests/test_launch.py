"""Launchers that start the processes themselves: `fabric run` hands its options to the Trainer and runs one DDP job
whose metrics are a single process's; under any launcher, a Trainer set for another number of processes stops before
touching data, saying what to pass.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
from lightning.pytorch.strategies import DDPStrategy
from scripts.beside import output_of
from scripts.runs import BATCH_SIZE, METRICS, TRAIN_ROWS, cli_args, in_process, logged_metrics

from mst_clipiqa.cli.commands import main
from mst_clipiqa.cli.trainer import MSTCLIPIQACLI
from mst_clipiqa.errors import OptionError
from mst_clipiqa.training.checkpoints import read_checkpoint
from mst_clipiqa.training.launch import check_world_size, take_launched_processes, take_launcher_options

DEFAULTS = {"accelerator": "auto", "strategy": "auto", "devices": 1, "num_nodes": 1, "precision": None}
# What `fabric run --accelerator cpu --strategy ddp --devices 2 --precision bf16-mixed` leaves to its processes.
FABRIC_RUN = {
    "LT_CLI_USED": "1", "LT_ACCELERATOR": "cpu", "LT_STRATEGY": "ddp", "LT_DEVICES": "2", "LT_NUM_NODES": "1",
    "LT_PRECISION": "bf16-mixed",
}  # fmt: skip
EPOCHS = 2  # of the fit under fabric run


@pytest.fixture
def fabric_run_env(monkeypatch):
    for name, value in FABRIC_RUN.items():
        monkeypatch.setenv(name, value)


def test_fabric_run_fills_the_options_left_at_their_default(fabric_run_env):
    trainer = dict(DEFAULTS)
    take_launcher_options(trainer, DEFAULTS)
    assert trainer == {"accelerator": "cpu", "strategy": "ddp", "devices": 2, "num_nodes": 1, "precision": "bf16-mixed"}


def test_options_set_win_over_fabric_run_and_auto_counts_as_unset(fabric_run_env):
    trainer = {**DEFAULTS, "accelerator": "auto", "devices": "auto", "precision": "32-true", "num_nodes": 2}
    with pytest.warns(UserWarning, match=r"--trainer.precision 32-true \(fabric run gave bf16-mixed\)"):
        take_launcher_options(trainer, DEFAULTS)
    assert trainer == {"accelerator": "cpu", "strategy": "ddp", "devices": 2, "num_nodes": 2, "precision": "32-true"}


def test_fabric_runs_auto_and_gpu_ids_pass_through(monkeypatch):
    monkeypatch.setenv("LT_ACCELERATOR", "auto")
    monkeypatch.setenv("LT_DEVICES", "0,1")
    trainer = dict(DEFAULTS)
    take_launcher_options(trainer, DEFAULTS)
    assert trainer == {**DEFAULTS, "devices": "0,1"}


def test_the_cli_takes_fabric_runs_options_and_keeps_those_set(fabric_run_env, demo_data, tiny_clip, tmp_path):
    # The packaged demo config writes `devices: 1`, the default: fabric run's 2 devices fill it in.
    args = cli_args(demo_data, tiny_clip, tmp_path / "run", "--trainer.precision", "32-true")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        with pytest.warns(UserWarning, match=r"--trainer.precision 32-true \(fabric run gave bf16-mixed\)"):
            cli = MSTCLIPIQACLI(args=args, run=False)  # builds the Trainer, runs nothing
    assert (cli.trainer.num_devices, cli.trainer.num_nodes) == (2, 1)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.trainer.precision == "32-true"  # set on the command line: fabric run's bf16-mixed does not apply
    assert cli.config.trainer.devices == 2  # what the run's config.yaml records


@pytest.mark.parametrize(
    ("world", "per_node", "devices", "nodes", "advice"),
    [
        (4, 2, 2, 2, None),  # torchrun --nnodes 2 --nproc_per_node 2 with the matching options
        (4, 2, 4, 1, "Pass --trainer.devices 2 --trainer.num_nodes 2, or launch 4 processes."),  # nodes wrong
        (1, 1, 2, 1, "Pass --trainer.devices 1 --trainer.num_nodes 1, or launch 2 processes."),  # too few processes
    ],
)
def test_the_trainer_must_match_the_processes_launched(monkeypatch, world, per_node, devices, nodes, advice):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    if advice is None:
        check_world_size(devices, nodes, "ddp")
    else:
        with pytest.raises(OptionError, match=re.escape(advice)):
            check_world_size(devices, nodes, "ddp")


SRUN = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mst-clipiqa", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
}  # fmt: skip
TORCHRUN = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


@pytest.mark.parametrize("launcher", [TORCHRUN, SRUN], ids=["torchrun", "srun"])
def test_a_launch_of_two_processes_with_one_device_stops_before_any_data_work(
    launcher, monkeypatch, demo_data, tiny_clip, tmp_path
):
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    with pytest.raises(OptionError) as error:
        in_process("fit", cli_args(demo_data, tiny_clip, run_dir))
    assert "The launcher started 2 processes" in str(error.value)
    assert "each would run a fit of its own. Pass --trainer.devices 2 --trainer.num_nodes 1 --trainer.strategy ddp" in (
        str(error.value)
    )
    assert not run_dir.exists()  # no log folder, no splits: nothing was read or written


def test_fabric_run_starts_one_ddp_fit_that_evaluates_like_one_process(
    fabric_fit_beside, demo_data, tiny_clip, tmp_path
):
    """`fabric run --accelerator cpu --devices 2 --strategy ddp $(which mst-clipiqa) fit ...`, as a user types it, run
    beside the tests before this one (conftest.py)."""
    run_dir = fabric_fit_beside.run_dir
    output_of(fabric_fit_beside.running.result())
    assert fabric_fit_beside.epochs == EPOCHS

    assert len(list(run_dir.rglob("metrics.csv"))) == 1  # one run, not one per process
    (last,) = run_dir.rglob("last.ckpt")
    steps_per_epoch = math.ceil(math.ceil(TRAIN_ROWS / 2) / BATCH_SIZE)  # each of the 2 ranks trains on half the rows
    assert read_checkpoint(last)["global_step"] == EPOCHS * steps_per_epoch

    validated = [row for row in logged_metrics(run_dir) if "val/srcc" in row]
    assert [row["epoch"] for row in validated] == list(range(EPOCHS))
    one = in_process("validate", cli_args(demo_data, tiny_clip, tmp_path / "one", "--ckpt_path", str(last)))
    assert one.trainer.world_size == 1
    keys = [f"val/{name}" for name in METRICS]
    one_process = {key: one.trainer.callback_metrics[key].item() for key in keys}
    assert {key: validated[-1][key] for key in keys} == pytest.approx(one_process, abs=1e-6, rel=0)


@pytest.mark.parametrize("launcher", [TORCHRUN, SRUN], ids=["torchrun", "srun"])
def test_score_takes_the_processes_launched_as_its_devices(launcher, monkeypatch):
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    defaults = {"devices": 1, "num_nodes": 1}
    options = dict(defaults)
    take_launched_processes(options, defaults)
    assert options == {"devices": 2, "num_nodes": 1}
    set_by_user = {"devices": 3, "num_nodes": 1}
    take_launched_processes(set_by_user, defaults)
    assert set_by_user == {"devices": 3, "num_nodes": 1}  # left for check_world_size to refuse


def test_score_under_a_launcher_names_its_own_options(monkeypatch, saved_models, demo_data, tmp_path, capsys):
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "scores.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(saved_models["template"][1]), demo_data, "--out", str(out), "--devices", "3",
              "--accelerator", "cpu"])  # fmt: skip
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "The launcher started 2 processes" in error and "Pass --devices 2 --num_nodes 1, or launch 3" in error
    assert "--trainer." not in error and not out.exists()
