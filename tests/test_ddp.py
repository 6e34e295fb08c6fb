"""DDP on CPU, end to end: under torchrun, fit completes on 2 gloo ranks, and validating and testing its checkpoint on
the 2 ranks gives the SRCC, PLCC, KRCC and RMSE of 1 process to 1e-6, on odd-sized splits that a padding sampler would
skew. SLURM's srun is detected from the variables it sets.
"""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from scripts.beside import output_of
from scripts.runs import (
    BATCH_SIZE,
    METRICS,
    TEST_ROWS,
    TRAIN_ROWS,
    VAL_ROWS,
    logged_metrics,
)
from torch.utils.data import DistributedSampler

from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.metrics import make_metrics
from mst_clipiqa.training.checkpoints import read_checkpoint
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

EPOCHS = 2  # of the fit under torchrun


@pytest.fixture(scope="module")
def ddp(torchrun_fit_beside) -> dict:
    """A 2-rank fit under torchrun, then validate and test of its last checkpoint on the same 2 ranks, run beside the
    tests before these (conftest.py)."""
    run = torchrun_fit_beside
    output_of(run.running.result())
    assert run.epochs == EPOCHS
    return {**json.loads((run.folder / "results.json").read_text()), "run_dir": run.folder / "run"}


@pytest.fixture(scope="module")
def one_process(ddp, tmp_path_factory) -> tuple[dict, L.Trainer, MSTCLIPIQAModule, IQADataModule]:
    """The same checkpoint evaluated by 1 process, with the model and data settings stored in it."""
    data = IQADataModule.load_from_checkpoint(ddp["checkpoint"], weights_only=True)
    module = MSTCLIPIQAModule.load_from_checkpoint(ddp["checkpoint"])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path_factory.mktemp("one-process"),
    )  # fmt: skip
    (validated,) = trainer.validate(module, datamodule=data, verbose=False)
    (tested,) = trainer.test(module, datamodule=data, verbose=False)
    return {**validated, **tested}, trainer, module, data


def test_fit_under_ddp_completes_with_sharded_training_and_whole_set_validation(ddp):
    saved = read_checkpoint(ddp["checkpoint"])
    steps_per_epoch = math.ceil(math.ceil(TRAIN_ROWS / 2) / BATCH_SIZE)  # each rank trains on half the rows
    assert (saved["epoch"], saved["global_step"]) == (EPOCHS - 1, EPOCHS * steps_per_epoch)
    validations = [row for row in logged_metrics(ddp["run_dir"]) if "val/srcc" in row and "epoch" in row]
    assert [row["epoch"] for row in validations][:EPOCHS] == list(range(EPOCHS))
    assert all(math.isfinite(row[f"val/{name}"]) for row in validations for name in METRICS)


def test_two_ranks_under_torchrun_evaluate_exactly_like_one_process(ddp, one_process):
    one, trainer, _, _ = one_process
    assert (ddp["world_size"], ddp["cluster_environment"]) == (2, "TorchElasticEnvironment")
    assert trainer.world_size == 1
    keys = [f"{stage}/{name}" for stage in ("val", "test") for name in METRICS] + ["test/plcc_logistic"]
    # val/loss is left out: a mean of per-batch objectives, it depends on how the rows are batched.
    assert {key: ddp[key] for key in keys} == pytest.approx({key: one[key] for key in keys}, abs=1e-6, rel=0)


def test_a_padding_sampler_would_have_changed_the_metrics(ddp, one_process):
    _, trainer, module, data = one_process
    predictions = trainer.predict(module, datamodule=data)  # the test rows, in order
    score = torch.cat([p["score"] for p in predictions])
    index = torch.cat([p["index"] for p in predictions])
    mos = torch.tensor(data.load_table()["mos_quality"], dtype=torch.float32)[index]
    assert len(score) == TEST_ROWS and TEST_ROWS % 2 == 1 and VAL_ROWS % 2 == 1

    def srcc_plcc(rows: list[int]) -> tuple[float, float]:
        metrics = make_metrics()
        metrics.update(score[rows], mos[rows])
        values = metrics.compute()
        return values["srcc"].item(), values["plcc"].item()

    exact = srcc_plcc(list(range(TEST_ROWS)))
    assert exact == pytest.approx((ddp["test/srcc"], ddp["test/plcc"]), abs=1e-6)
    # What 2 ranks would have fed the metrics with torch's DistributedSampler: 14 rows, one of them twice.
    padded = [i for rank in (0, 1) for i in DistributedSampler(range(TEST_ROWS), 2, rank, shuffle=False)]
    assert len(padded) == TEST_ROWS + 1
    assert max(abs(a - b) for a, b in zip(srcc_plcc(padded), exact)) > 1e-4


@pytest.mark.parametrize(("job_name", "detected"), [("mst-clipiqa", True), ("bash", False)])
def test_slurm_is_detected_from_the_variables_srun_sets(monkeypatch, job_name, detected):
    # One node, one task. A job named "bash" or "interactive" is an salloc shell: Lightning leaves SLURM alone.
    for name, value in {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": job_name, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1", "SLURM_NODELIST": "node-a", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) == detected
    if detected:
        assert (environment.main_address, environment.world_size(), environment.global_rank()) == ("node-a", 1, 0)
        assert environment.auto_requeue  # SIGUSR1 saves a checkpoint and requeues (tests/test_resume.py)
