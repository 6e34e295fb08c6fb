"""The training objective: MSE plus a pairwise margin ranking term."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossConfig:
    """Weights of the objective MSE(score, mos) + rank_weight * ranking(margin)."""

    rank_weight: float = 1.0
    """lambda: weight of the pairwise ranking term (0 turns it off)."""
    margin: float = 0.1
    """Margin of the ranking hinge, on the head's internal 1..5 scale."""


def pairwise_ranking_loss(score: Tensor, mos: Tensor, margin: float) -> Tensor:
    """Mean over ordered pairs with mos_i != mos_j of ReLU(-sign(mos_i - mos_j) * (score_i - score_j) + margin)."""
    sign = torch.sign(mos[:, None] - mos[None, :])  # (B, B); 0 on the diagonal and on ties
    hinge = F.relu(-sign * (score[:, None] - score[None, :]) + margin)  # (B, B)
    valid = sign != 0
    if not valid.any():
        return score.sum() * 0  # keeps the graph for a batch of equal MOS
    return hinge[valid].mean()


def iqa_loss(score: Tensor, mos: Tensor, config: LossConfig) -> Tensor:
    """score and mos (B,) on the same scale."""
    score, mos = score.float(), mos.float()
    loss = F.mse_loss(score, mos)
    if config.rank_weight:
        loss = loss + config.rank_weight * pairwise_ranking_loss(score, mos, config.margin)
    return loss
