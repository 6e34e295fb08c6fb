"""MST-CLIPIQA: multi-scale two-stream CLIP quality assessment for AI-generated images.

    from mst_clipiqa import load_scorer
    scores = load_scorer("path/or/hub-id").score(["a.png", "b.jpg"])

The public names below are imported on first use, so `import mst_clipiqa` stays cheap (no torch, no Lightning).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_scorer": "mst_clipiqa.scoring.scorer",
    "Scorer": "mst_clipiqa.scoring.scorer",
    "MSTCLIPIQAScore": "mst_clipiqa.scoring.image_metric",
    "save_pretrained": "mst_clipiqa.hub.pretrained",
    "from_pretrained": "mst_clipiqa.hub.pretrained",
    "push_to_hub": "mst_clipiqa.hub.pretrained",
    "MSTCLIPIQAModule": "mst_clipiqa.training.lit_module",
    "OptimConfig": "mst_clipiqa.training.lit_module",
    "LossConfig": "mst_clipiqa.losses",
    "MSTCLIPIQA": "mst_clipiqa.model",
    "ModelConfig": "mst_clipiqa.model",
    "IQADataModule": "mst_clipiqa.data.datamodule",
    "WandbEvaluationLogger": "mst_clipiqa.training.callbacks",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mst_clipiqa' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
