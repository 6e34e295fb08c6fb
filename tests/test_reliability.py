"""Bad checkpoints and degenerate inputs: each gives a clear error or a well-defined result, never a crash later on.

Checkpoints are read with weights_only=True everywhere, and a truncated or tampered one is refused with an error
naming it, its payload never run. Constant predictions leave checkpointing and early stopping working, an evaluation
split under two rows is refused at setup, and head B takes empty and over-long prompts.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from scripts.runs import METRICS, cli_args, embedding_rows, in_process
from torch.utils.data import DataLoader

import mst_clipiqa
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.data.splits import Split, save_splits
from mst_clipiqa.data.tables import load_source
from mst_clipiqa.errors import BadCheckpointError
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.training.checkpoints import ResumingModelCheckpoint, read_checkpoint
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule, OptimConfig


def make_module(clip, variant: str = "template", tau_init: float = 3.0, lr: float = 3e-3) -> MSTCLIPIQAModule:
    net = ModelConfig(coarse_encoder=clip[0], fine_encoder=clip[1], variant=variant, tau_init=tau_init)
    module = MSTCLIPIQAModule(net=net, optim=OptimConfig(lr=lr, scheduler="constant"))
    module.net.set_mos_range(0.0, 5.0)
    return module


def trainer(root: Path, **kwargs) -> L.Trainer:
    options = dict(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=root,
    )  # fmt: skip
    return L.Trainer(**{**options, **kwargs})


@pytest.fixture(scope="module")
def checkpoint(tiny_clip, tmp_path_factory) -> Path:
    """A checkpoint of a briefly trained module, as Lightning writes it."""
    folder = tmp_path_factory.mktemp("checkpoint")
    rows = embedding_rows(16)
    fitted = trainer(folder)
    fitted.fit(make_module(tiny_clip), DataLoader(rows, batch_size=8))
    fitted.save_checkpoint(folder / "model.ckpt")
    return folder / "model.ckpt"


class Payload:
    """Creates a file when unpickled: what a malicious __reduce__ would do with worse commands."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


# ---- checkpoints ---------------------------------------------------------------------------------------------------


def test_checkpoints_hold_plain_data_only(checkpoint):
    raw = torch.load(checkpoint, weights_only=True)
    assert isinstance(raw["hyper_parameters"]["net"], dict) and isinstance(raw["hyper_parameters"]["optim"], dict)
    loaded = MSTCLIPIQAModule.load_from_checkpoint(checkpoint)
    assert loaded.net.mos_range.tolist() == [0.0, 5.0]


def loaders(demo_data: str, clip, root: Path) -> dict:
    return {
        "read_checkpoint": read_checkpoint,
        "load_from_checkpoint": MSTCLIPIQAModule.load_from_checkpoint,
        "cli validate": lambda path: in_process(
            "validate", [*cli_args(demo_data, clip, root), "--ckpt_path", str(path)]
        ),
    }


@pytest.mark.parametrize("loader", ["read_checkpoint", "load_from_checkpoint", "cli validate"])
def test_a_tampered_checkpoint_is_refused_by_name_and_its_payload_never_runs(
    checkpoint, tiny_clip, demo_data, tmp_path, monkeypatch, loader
):
    # Even where torch is told to unpickle anything by default, the package asks for weights_only explicitly.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "payload-ran"
    tampered = torch.load(checkpoint, weights_only=True)
    tampered["hyper_parameters"]["note"] = Payload(marker)
    path = tmp_path / "tampered.ckpt"
    torch.save(tampered, path)
    with pytest.raises(BadCheckpointError, match="refused to load") as caught:
        loaders(demo_data, tiny_clip, tmp_path / "run")[loader](path)
    assert str(path) in str(caught.value) and "(GLOBAL getattr)" in str(caught.value)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is live: unpickled, it does run
    assert marker.exists()


@pytest.mark.parametrize("damage", ["cut in half", "cut by 10 bytes", "empty", "text"])
@pytest.mark.parametrize("loader", ["read_checkpoint", "load_from_checkpoint"])
def test_a_truncated_or_foreign_checkpoint_is_refused_by_name(checkpoint, tmp_path, damage, loader):
    data = checkpoint.read_bytes()
    damaged = {"cut in half": data[: len(data) // 2], "cut by 10 bytes": data[:-10], "empty": b"", "text": b"hello\n"}
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(damaged[damage])
    with pytest.raises(BadCheckpointError, match="is not a readable checkpoint") as caught:
        loaders("", ("", ""), tmp_path)[loader](path)
    assert str(path) in str(caught.value)


def test_nothing_in_the_package_trusts_remote_code():
    sources = Path(mst_clipiqa.__file__).parent.rglob("*.py")
    assert not [path for path in sources if "trust_remote_code" in path.read_text()]


# ---- degenerate inputs ---------------------------------------------------------------------------------------------


def test_constant_predictions_never_stop_checkpointing_or_early_stopping(tiny_clip, tmp_path):
    # tau = 0 makes head A's softmax uniform: every score is exactly 3, and lr = 0 keeps it so.
    module = make_module(tiny_clip, tau_init=0.0, lr=0.0)
    rows = embedding_rows(24)
    checkpoints = ResumingModelCheckpoint(
        dirpath=tmp_path / "checkpoints", monitor="val/srcc", mode="max", save_last=True
    )
    early_stopping = EarlyStopping(monitor="val/srcc", mode="max", patience=3)  # checks for NaN too
    fit = trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[checkpoints, early_stopping])
    with pytest.warns(UserWarning, match="Correlation is undefined"):
        fit.fit(module, DataLoader(rows[:16], batch_size=8), DataLoader(rows[16:], batch_size=8))
        (tested,) = fit.test(module, DataLoader(rows, batch_size=8), ckpt_path="best", verbose=False)
    correlations = ("test/srcc", "test/plcc", "test/krcc", "test/plcc_logistic")
    assert {key: tested[key] for key in correlations} == dict.fromkeys(correlations, 0.0)
    assert fit.current_epoch == 3 and early_stopping.stopped_epoch == 0
    assert checkpoints.best_model_score == 0.0 and Path(checkpoints.best_model_path).is_file()
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["epoch"] == 2


def test_an_evaluation_split_under_two_rows_is_refused_at_setup(demo_data, tiny_clip, tmp_path):
    table = load_source("agiqa-3k", demo_data)
    rows = range(len(table))
    splits_file = tmp_path / "splits.json"
    save_splits([Split("one-val-row", tuple(rows[:-6]), (rows[-6],), tuple(rows[-5:]))], splits_file, table)
    data = IQADataModule(source="agiqa-3k", root=demo_data, splits_file=str(splits_file))
    data.follow(ModelConfig(tiny_clip[0]))
    with pytest.raises(ValueError, match="the val part of split one-val-row has fewer than 2 rows"):
        data.setup("fit")


def test_head_b_takes_empty_and_over_long_prompts(tiny_clip, tmp_path):
    module = make_module(tiny_clip, variant="prompt")
    prompts = ["", "word " * 200, "a red circle above a blue square"]
    rows = [{**row, "prompt": prompts[i % 3]} for i, row in enumerate(embedding_rows(24))]
    for row in rows:  # the prompts are encoded by the model's text tower, not read from a cache
        del row["prompt_states"], row["prompt_mask"]
    fit = trainer(tmp_path)
    with pytest.warns(UserWarning, match=r"prompt\(s\) exceed 77 tokens and were truncated"):
        fit.fit(module, DataLoader(rows[:12], batch_size=6), DataLoader(rows[12:], batch_size=6))
    assert all(math.isfinite(fit.callback_metrics[f"val/{name}"]) for name in METRICS)
    predictions = fit.predict(module, DataLoader(rows, batch_size=6))
    assert torch.isfinite(torch.cat([p["score"] for p in predictions])).all()
