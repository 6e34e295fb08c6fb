import json
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from scipy import stats
from scripts.ranks import metrics_of_shards, run_ranks
from scripts.ranks import mos_like as _mos_like
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from mst_clipiqa import metrics as metrics_module
from mst_clipiqa.metrics import KRCC, PLCC, RMSE, SRCC, LogisticPLCC, make_metrics, plcc_logistic

UNDEFINED = "Correlation is undefined"
KEYS = ["srcc", "plcc", "krcc", "rmse", "plcc_logistic"]


def _feed(
    metrics: MetricCollection, preds: torch.Tensor, target: torch.Tensor, batch_size: int = 8
) -> dict[str, float]:
    for p, t in zip(preds.split(batch_size), target.split(batch_size)):
        metrics.update(p, t)
    return {key.split("/")[-1]: value.item() for key, value in metrics.compute().items()}


def _reference(preds: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    x, y = preds.double().numpy(), target.double().numpy()
    return {
        "srcc": stats.spearmanr(x, y).statistic,
        "plcc": stats.pearsonr(x, y).statistic,
        "krcc": stats.kendalltau(x, y).statistic,
        "rmse": float(np.sqrt(np.mean((x - y) ** 2))),
        "plcc_logistic": plcc_logistic(x, y),
    }


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_and_numpy(seed, ties):
    preds, target = _mos_like(200 + 37 * seed, seed, ties)
    got = _feed(make_metrics("val/", logistic=True), preds, target)
    want = _reference(preds, target)
    assert got.keys() == want.keys()
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-6, rel=1e-6), key


def test_keys_carry_the_prefix():
    assert set(make_metrics("val/").keys()) == {"val/srcc", "val/plcc", "val/krcc", "val/rmse"}
    assert "test/plcc_logistic" in make_metrics("test/", logistic=True).keys()


def test_bf16_inputs_give_the_fp32_result_of_the_same_values():
    preds, target = _mos_like(300, 3, ties=False)
    preds_bf16, target_bf16 = preds.bfloat16(), target.bfloat16()
    assert preds_bf16.unique().numel() < preds.numel()  # bf16 keeps ~3 significant digits: ties appear

    from_bf16 = _feed(make_metrics(logistic=True), preds_bf16, target_bf16)
    from_fp32 = _feed(make_metrics(logistic=True), preds_bf16.float(), target_bf16.float())

    assert from_bf16 == from_fp32
    assert from_fp32 == pytest.approx(_reference(preds_bf16.float(), target_bf16.float()), abs=1e-6)


def test_half_and_double_inputs_are_stored_as_float32():
    metric = SRCC()
    metric.update(
        torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    )
    assert all(state.dtype == torch.float32 for state in metric.preds + metric.target)


@pytest.mark.parametrize("shape", [(4, 1), (4, 2), ()])
def test_rejects_inputs_that_are_not_1d(shape):
    with pytest.raises(ValueError, match="expected 1-D"):
        make_metrics().update(torch.zeros(shape), torch.zeros(shape))


def test_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        PLCC().update(torch.zeros(3), torch.zeros(4))


def test_calling_a_metric_only_accumulates():
    # A batch of one must not fail: calling the metric is update, and the value comes from compute.
    preds, target = _mos_like(9, 4, ties=False)
    metrics = make_metrics()
    for p, t in zip(preds.split(1), target.split(1)):
        assert all(value is None for value in metrics(p, t).values())
    assert metrics.compute()["srcc"].item() == pytest.approx(stats.spearmanr(preds, target).statistic, abs=1e-6)


@pytest.mark.parametrize("constant", ["preds", "target", "both"])
def test_constant_inputs_report_zero_with_one_warning(constant):
    preds, target = _mos_like(20, 5, ties=False)
    if constant in ("preds", "both"):
        preds = torch.full_like(preds, 3.0)
    if constant in ("target", "both"):
        target = torch.full_like(target, 50.0)
    metrics = make_metrics("val/", logistic=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(2):  # two validation epochs
            values = _feed(metrics, preds, target)
            metrics.reset()

    assert [values[key] for key in ("srcc", "plcc", "krcc", "plcc_logistic")] == [0.0] * 4
    assert values["rmse"] == pytest.approx((preds - target).square().mean().sqrt().item(), rel=1e-6)
    messages = [str(w.message) for w in caught if UNDEFINED in str(w.message)]
    assert len(messages) == 1, "one warning for four metrics over two epochs"
    expected_side = {"preds": "the predictions are", "target": "the MOS are", "both": "predictions and the MOS are"}
    assert expected_side[constant] in messages[0]


@pytest.mark.parametrize("metric_cls", [SRCC, PLCC, KRCC, RMSE, LogisticPLCC])
@pytest.mark.parametrize("count", [0, 1])
@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_fewer_than_two_pairs_is_an_error(metric_cls, count):
    metric = metric_cls()
    if count:
        metric.update(torch.tensor([1.0]), torch.tensor([2.0]))
    with pytest.raises(ValueError, match=f"needs at least 2 .* but saw {count}"):
        metric.compute()


def test_plcc_logistic_improves_on_plain_plcc_for_a_monotone_nonlinear_relation():
    rng = np.random.default_rng(0)
    preds = rng.uniform(-3, 3, 400)
    mos = 1 + 4 / (1 + np.exp(-2.5 * preds)) + rng.normal(0, 0.15, 400)  # saturating MOS on a 1..5 scale

    plain = stats.pearsonr(preds, mos).statistic
    fitted = plcc_logistic(preds, mos)

    assert fitted > plain + 0.02
    assert fitted == pytest.approx(1.0, abs=0.02)
    assert plcc_logistic(torch.from_numpy(preds).float(), torch.from_numpy(mos).float()) == pytest.approx(fitted, 1e-5)


def test_plcc_logistic_keeps_the_sign_of_an_anticorrelated_predictor():
    rng = np.random.default_rng(1)
    preds = rng.uniform(0, 10, 300)
    mos = 80 - 5 * np.exp(preds / 4) + rng.normal(0, 2, 300)
    plain = stats.pearsonr(preds, mos).statistic
    assert plain < 0
    assert plcc_logistic(preds, mos) <= plain


def test_plcc_logistic_falls_back_to_plain_plcc_when_the_fit_fails(monkeypatch):
    def failing_fit(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(metrics_module, "curve_fit", failing_fit)
    preds, target = _mos_like(50, 6, ties=False)
    with pytest.warns(UserWarning, match="logistic fit failed"):
        value = plcc_logistic(preds, target)
    assert value == pytest.approx(stats.pearsonr(preds.double(), target.double()).statistic, abs=1e-12)


def test_plcc_logistic_input_checks():
    with pytest.raises(ValueError, match="saw 1"):
        plcc_logistic([1.0], [2.0])
    with pytest.raises(ValueError, match="same length"):
        plcc_logistic([1.0, 2.0], [2.0, 3.0, 4.0])
    with pytest.warns(UserWarning, match=UNDEFINED):
        assert plcc_logistic([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


# --- DDP: several gloo processes, each holding the shard EvalDistributedSampler gives it ---------------------------


DDP_CASES = [(3, 40), (3, 2)]
"""(world size, n): (3, 2) leaves the last rank no sample at all."""


@pytest.fixture(scope="module")
def ddp_values(rank_server_beside, tmp_path_factory) -> dict[tuple[int, int], dict[str, float]]:
    """The metrics rank 0 computed in each of `DDP_CASES`: one gloo group per world size runs its cases."""
    values = {}
    for world_size in sorted({world_size for world_size, _ in DDP_CASES}):
        sizes = [n for size, n in DDP_CASES if size == world_size]
        folder = tmp_path_factory.mktemp(f"ddp-{world_size}")
        run_ranks(metrics_of_shards, (world_size, str(folder / "init"), str(folder / "values.json"), sizes), world_size)
        computed = json.loads((folder / "values.json").read_text())
        values.update({(world_size, n): computed[str(n)] for n in sizes})
    return values


@pytest.mark.parametrize(("world_size", "n"), DDP_CASES)
@pytest.mark.filterwarnings("ignore:2 pairs cannot fit")
def test_ddp_equals_one_process_over_the_union(ddp_values, world_size, n):
    # (3, 2): the last rank receives no sample at all and must still take part in the gather; two pairs are too few
    # for the logistic fit, which falls back to plain PLCC on every rank alike.
    preds, target = _mos_like(n, 7, ties=True)
    alone = _feed(make_metrics("test/", logistic=True), preds.bfloat16(), target)
    gathered = {key.split("/")[-1]: value for key, value in ddp_values[world_size, n].items()}
    assert gathered == pytest.approx(alone, abs=1e-6)


# --- Lightning: constant first-epoch predictions must not stop training or checkpointing ---------------------------


class _ConstantFirstEpoch(L.LightningModule):
    """A linear scorer whose validation predictions are constant in epoch 0, like an untrained head."""

    def __init__(self, log_metric_objects: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.val_metrics = make_metrics("val/")
        self.log_metric_objects = log_metric_objects
        self.logged_srcc: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        preds = self.linear(x).squeeze(-1)
        if self.current_epoch == 0:
            preds = torch.zeros_like(preds)
        self.val_metrics.update(preds, y)
        if self.log_metric_objects:
            self.log_dict(self.val_metrics)

    def on_validation_epoch_end(self):
        if not self.log_metric_objects:
            self.log_dict(self.val_metrics.compute())
            self.val_metrics.reset()

    def on_train_epoch_end(self):
        self.logged_srcc.append(self.trainer.callback_metrics["val/srcc"].item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("log_metric_objects", [False, True])
def test_training_survives_constant_first_validation(tmp_path, log_metric_objects):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(64)
    train = DataLoader(TensorDataset(x[:48], y[:48]), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[48:], y[48:]), batch_size=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/srcc", mode="max")
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[checkpoint, EarlyStopping(monitor="val/srcc", mode="max", patience=3)],
    )
    model = _ConstantFirstEpoch(log_metric_objects)

    with pytest.warns(UserWarning, match=UNDEFINED):
        trainer.fit(model, train, val)

    assert trainer.current_epoch == 2 and not trainer.should_stop
    assert model.logged_srcc[0] == 0.0
    assert model.logged_srcc[1] > 0.9
    assert checkpoint.best_model_score.item() == pytest.approx(model.logged_srcc[1])
    assert (tmp_path / checkpoint.best_model_path).is_file()
