"""Shared fixtures: tiny random CLIP checkpoints saved to disk and loaded by path (no network, ever)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread, in this process and in the processes it starts, as in the runs of `scripts.runs`: the tests' tiny
# models make small operations, which a second thread slows down (it mostly waits, spinning, for the first), and far
# more while the other core runs a test's other process. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mst_clipiqa.tiny_clip import build_tiny_pair  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory):
    """The session's own feature cache folder, so no test reads or fills the user's cache."""
    os.environ["MST_CLIPIQA_FEATURES"] = str(tmp_path_factory.mktemp("feature-cache"))
    return os.environ["MST_CLIPIQA_FEATURES"]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[str, str]:
    """(coarse, fine) tiny CLIP checkpoints, patch 32 and 16, 64-wide embeddings."""
    coarse, fine = build_tiny_pair(tmp_path_factory.mktemp("tiny-clip"))
    return str(coarse), str(fine)


@pytest.fixture(scope="session")
def tiny_clip_512(tmp_path_factory) -> tuple[str, str]:
    """Tiny towers that project to 512, the width of the real ViT-B/32 and B/16 embeddings."""
    coarse, fine = build_tiny_pair(tmp_path_factory.mktemp("tiny-clip-512"), projection_dim=512)
    return str(coarse), str(fine)


@pytest.fixture(scope="session")
def saved_models(tiny_clip, tmp_path_factory) -> dict[str, tuple]:
    """variant → (a module of that head with weights as after training, the folder it is saved to), for the tests
    that score with them; neither is changed by any."""
    from scripts.models import trained_module

    from mst_clipiqa.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("saved-models")
    modules = {variant: trained_module(tiny_clip, variant) for variant in ("template", "prompt")}
    return {variant: (module, save_pretrained(module, root / variant)) for variant, module in modules.items()}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """A small demo data set in AGIQA-3K's layout."""
    from mst_clipiqa.data.synthetic import make_demo_dataset

    return str(make_demo_dataset(tmp_path_factory.mktemp("demo") / "agiqa3k-demo", n_scenes=16))
