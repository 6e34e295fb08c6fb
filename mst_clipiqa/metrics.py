"""Evaluation metrics over a whole evaluation set: SRCC, PLCC, KRCC, RMSE and logistic-fitted PLCC.

Each is computed once over the whole set (a rank correlation of one batch says little), exactly under DDP: the
correlations keep every (prediction, MOS) pair, gathered across ranks, and PLCC is computed from them in float64
(torchmetrics' `PearsonCorrCoef` merges float32 moments); RMSE keeps sums. Inputs are stored as float32, so bf16
predictions are not ranked in bf16. Constant predictions, usual in the first epochs, leave the correlations
undefined: they are reported as 0.0, "no association", with one warning (a NaN would stop `EarlyStopping`).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import expit
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.functional.regression import pearson_corrcoef
from torchmetrics.regression import KendallRankCorrCoef, MeanSquaredError, SpearmanCorrCoef
from torchmetrics.utilities import rank_zero_warn


def _float32_pairs(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if preds.ndim != 1 or preds.shape != target.shape:
        raise ValueError(
            f"expected 1-D predictions and MOS of the same length, got shapes {tuple(preds.shape)} and "
            f"{tuple(target.shape)}"
        )
    return preds.float(), target.float()


def _concat(state: list[Tensor] | Tensor) -> Tensor:
    """A list state before sync, or the tensor torchmetrics leaves after gathering it."""
    if isinstance(state, Tensor):
        return state
    return torch.cat(state) if state else torch.empty(0)


def _require_pairs(count: int, metric: str) -> None:
    if count < 2:
        raise ValueError(
            f"{metric} needs at least 2 (prediction, MOS) pairs but saw {count}; check the size of the evaluation "
            "split and the Trainer's limit_*_batches / num_sanity_val_steps"
        )


def _is_undefined(preds: Tensor | np.ndarray, target: Tensor | np.ndarray) -> bool:
    """True, after one warning, when constant predictions or MOS leave every correlation undefined."""
    constant = [name for name, x in (("predictions", preds), ("MOS", target)) if x.min() == x.max()]
    if not constant:
        return False
    rank_zero_warn(
        f"Correlation is undefined: the {' and the '.join(constant)} are constant over all {len(preds)} evaluation "
        "items (usual early in training). SRCC, PLCC and KRCC are reported as 0.0 (no association), not NaN.",
        UserWarning,
    )
    return True


_LOGISTIC_PARAMS = 4


def _logistic4(x: np.ndarray, top: float, bottom: float, centre: float, width: float) -> np.ndarray:
    """Monotone 4-parameter logistic from predictions to MOS; `expit` keeps large arguments finite."""
    return bottom + (top - bottom) * expit((x - centre) / abs(width))


def plcc_logistic(preds: Tensor | np.ndarray | Sequence[float], target: Tensor | np.ndarray | Sequence[float]) -> float:
    """PLCC after fitting the standard 4-parameter logistic from predictions to MOS.

    The map ``bottom + (top - bottom) / (1 + exp(-(x - centre) / |width|))`` is monotone, so SRCC and KRCC are
    unchanged, while PLCC no longer penalises a prediction scale that is nonlinear in MOS. It is fitted by least
    squares (`scipy.optimize.curve_fit`), starting from the MOS range, the mean and spread of the predictions, and a
    decreasing curve when the plain correlation is negative. A decreasing fit keeps the negative sign, so an
    anti-correlated predictor is not reported as a good one. With 4 pairs or fewer, or should the fit fail, the plain
    PLCC is returned with a warning.

    Args:
        preds: predictions, 1-D.
        target: MOS, 1-D, same length.

    Returns:
        The Pearson correlation between the fitted logistic of ``preds`` and ``target``, in float64; 0.0 with a
        warning when either side is constant.

    Raises:
        ValueError: the inputs are not 1-D of the same length, or hold fewer than 2 pairs.
    """
    x, y = _float64_array(preds), _float64_array(target)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"expected 1-D predictions and MOS of the same length, got shapes {x.shape} and {y.shape}")
    _require_pairs(len(x), "plcc_logistic")
    if _is_undefined(x, y):
        return 0.0
    plain = float(np.corrcoef(x, y)[0, 1])
    if len(x) <= _LOGISTIC_PARAMS:
        warnings.warn(
            f"{len(x)} pairs cannot fit a {_LOGISTIC_PARAMS}-parameter logistic; reporting plain PLCC instead",
            UserWarning,
            stacklevel=2,
        )
        return plain
    top, bottom = (y.max(), y.min()) if plain >= 0 else (y.min(), y.max())
    initial = [top, bottom, float(np.mean(x)), float(np.std(x))]
    try:
        with warnings.catch_warnings():
            # The parameter covariance is not used; only the fitted curve is.
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(_logistic4, x, y, p0=initial, maxfev=10_000)
        fitted = _logistic4(x, *params)
    except (RuntimeError, ValueError) as err:
        warnings.warn(f"logistic fit failed ({err}); reporting plain PLCC instead", UserWarning, stacklevel=2)
        return plain
    if not np.all(np.isfinite(fitted)) or fitted.min() == fitted.max():
        warnings.warn("logistic fit degenerated to a constant; reporting plain PLCC instead", UserWarning, stacklevel=2)
        return plain
    # A decreasing fit correlates positively with MOS; the sign of its slope keeps the sign of SRCC and plain PLCC.
    direction = 1.0 if params[0] >= params[1] else -1.0
    return direction * float(np.corrcoef(fitted, y)[0, 1])


def _float64_array(values: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, Tensor):
        # Through CPU first: some accelerators (MPS) have no float64.
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


class _EvaluationSetMetric:
    """Mixin for metrics of a whole evaluation set: float32 1-D inputs, and calling the metric only accumulates.

    A value per batch is not the metric of the set, and a batch may hold one item, so ``metric(preds, target)``
    updates the state and returns None, like `update`; read the value from `compute` at the end of the stage
    (Lightning logs nothing per step for such a metric, and the epoch value as usual).
    """

    def __init__(self, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # Keeping every pair is the point: a ranking needs the whole set.
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions", category=UserWarning)
            super().__init__(**kwargs)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of predictions and MOS, 1-D, on the benchmark's MOS scale."""
        super().update(*_float32_pairs(preds, target))

    def forward(self, preds: Tensor, target: Tensor) -> None:
        """Same as `update`."""
        self.update(preds, target)


class _Correlation(_EvaluationSetMetric):
    """Mixin: at least two pairs, and 0.0 with a warning where the correlation is undefined."""

    preds: list[Tensor] | Tensor
    target: list[Tensor] | Tensor
    higher_is_better = True

    def compute(self) -> Tensor:
        """The correlation over every pair seen, on all ranks."""
        preds, target = _concat(self.preds), _concat(self.target)
        _require_pairs(len(preds), type(self).__name__)
        if _is_undefined(preds, target):
            return torch.zeros((), device=preds.device)
        return super().compute()


class _PairedScores(Metric):
    """Keeps every (prediction, MOS) pair in float32 list states, concatenated across ranks, for `_score`."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Store a batch of pairs."""
        self.preds.append(preds)
        self.target.append(target)

    def compute(self) -> Tensor:
        """`_score` of every pair seen, on all ranks, as a float32 scalar on the metric's device."""
        preds, target = _concat(self.preds), _concat(self.target)
        return torch.tensor(self._score(preds, target), dtype=torch.float32, device=preds.device)

    @abstractmethod
    def _score(self, preds: Tensor, target: Tensor) -> float: ...


class SRCC(_Correlation, SpearmanCorrCoef):
    """Spearman rank correlation over the whole evaluation set (torchmetrics, average ranks for ties)."""


class KRCC(_Correlation, KendallRankCorrCoef):
    """Kendall's tau-b over the whole evaluation set (torchmetrics, corrected for ties like scipy's default)."""


class PLCC(_Correlation, _PairedScores):
    """Pearson linear correlation over the whole evaluation set, computed in float64 from the gathered pairs."""

    def _score(self, preds: Tensor, target: Tensor) -> float:
        return float(pearson_corrcoef(preds.cpu().double(), target.cpu().double()))


class LogisticPLCC(_Correlation, _PairedScores):
    """`plcc_logistic` over the whole evaluation set, as a metric that gathers every pair across ranks."""

    def _score(self, preds: Tensor, target: Tensor) -> float:
        return plcc_logistic(preds, target)


class RMSE(_EvaluationSetMetric, MeanSquaredError):
    """Root mean squared error between predictions and MOS, in MOS units."""

    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(squared=False, **kwargs)

    def compute(self) -> Tensor:
        """The RMSE over every pair seen, on all ranks."""
        _require_pairs(int(self.total), type(self).__name__)
        return super().compute()


def make_metrics(prefix: str = "", *, logistic: bool = False) -> MetricCollection:
    """SRCC, PLCC, KRCC and RMSE of one stage, keyed ``{prefix}srcc`` and so on (e.g. ``val/srcc``).

    Make one collection per stage. Feed it with ``update(preds, mos)`` in each step and log ``compute()`` in the
    ``on_*_epoch_end`` hook, then ``reset()``: the hook runs on every rank, so the cross-rank gather inside
    `compute` happens everywhere even when a rank received no batch.

    Args:
        prefix: key prefix, including its separator, e.g. ``"val/"``.
        logistic: also report ``{prefix}plcc_logistic`` (`LogisticPLCC`), a least-squares fit per compute, meant for
            the test stage.
    """
    metrics: dict[str, Metric] = {"srcc": SRCC(), "plcc": PLCC(), "krcc": KRCC(), "rmse": RMSE()}
    if logistic:
        metrics["plcc_logistic"] = LogisticPLCC()
    return MetricCollection(metrics, prefix=prefix)
