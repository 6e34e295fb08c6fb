"""Shared fixtures: tiny random CLIP checkpoints saved to disk and loaded by path (no network, ever), data and models
made once, and the work that runs beside the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread, in this process and in the processes it starts, as in the runs of `scripts.runs`: the tests' tiny
# models make small operations, which a second thread slows down (it mostly waits, spinning, for the first), and far
# more while the other core runs a test's other process. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Nothing the tests run writes into the user's home: W&B's data, cache and settings, anything kept under the XDG
# cache, config and data folders (matplotlib's, Jupyter's), and the notebook kernel's IPython profile go to one
# temporary folder of the session (removed at its end), in this process and its children.
_HOME_DIRS = tempfile.mkdtemp(prefix="mst-clipiqa-tests-")
_REDIRECTED = ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
               "XDG_DATA_HOME", "IPYTHONDIR", "MPLCONFIGDIR")  # fmt: skip
for _name in _REDIRECTED:
    os.environ[_name] = os.path.join(_HOME_DIRS, _name.lower())


def pytest_unconfigure(config):
    shutil.rmtree(_HOME_DIRS, ignore_errors=True)

from scripts.beside import Beside  # noqa: E402
from scripts.ranks import start_fork_server  # noqa: E402
from scripts.runs import SCRIPTS, cli_args, free_port, subprocess_env  # noqa: E402

from mst_clipiqa.demo.tiny_clip import build_tiny_pair  # noqa: E402


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

    from mst_clipiqa.hub.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("saved-models")
    modules = {variant: trained_module(tiny_clip, variant) for variant in ("template", "prompt")}
    return {variant: (module, save_pretrained(module, root / variant)) for variant, module in modules.items()}


@pytest.fixture(scope="session")
def cli_parser():
    """The parser `MSTCLIPIQACLI` parses its arguments with, built once: building it (reading every configurable
    class's source for its docstrings) takes most of the time that checking a command line takes."""
    from mst_clipiqa.cli.trainer import MSTCLIPIQACLI

    built = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MSTCLIPIQACLI, "parse_arguments", lambda cli, parser, args: built.append(parser) or sys.exit(0))
        with pytest.raises(SystemExit):
            MSTCLIPIQACLI(args=[])
    return built[0]


@pytest.fixture(scope="session")
def fit_help() -> str:
    """What `mst-clipiqa fit --help` prints, read once for the tests of the help."""
    import contextlib
    import io

    from mst_clipiqa.cli.commands import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--help"])
    return out.getvalue()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """A small demo data set in AGIQA-3K's layout."""
    from mst_clipiqa.demo.synthetic import make_demo_dataset

    return str(make_demo_dataset(tmp_path_factory.mktemp("demo") / "agiqa3k-demo", n_scenes=16))


# ---- work beside the tests ---------------------------------------------------------------------------------------

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="session")
def beside() -> Iterator[Beside]:
    """The lane of work beside the tests (`scripts.beside`)."""
    lane = Beside()
    yield lane
    lane.close()


@pytest.fixture(scope="session", autouse=True)
def work_beside_started(request, feature_cache) -> None:
    """Start, at the start of the session, the work beside the tests that the selected tests check (the fixtures
    named *_beside), in the order of those tests."""
    used = [name for item in request.session.items for name in item.fixturenames if name.endswith("_beside")]
    for name in dict.fromkeys(used):
        request.getfixturevalue(name)


@pytest.fixture(scope="session")
def torchrun_fit_beside(beside, tiny_clip, demo_data, tmp_path_factory) -> SimpleNamespace:
    """A 2-epoch fit on 2 gloo ranks under torchrun, then validate and test of its last checkpoint on the same ranks
    (`scripts/fit_and_evaluate.py`, which writes results.json): its folder, its epochs, and the run to come
    (tests/test_ddp.py)."""
    folder, epochs = tmp_path_factory.mktemp("ddp"), 2
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2")
    args = cli_args(demo_data, tiny_clip, folder / "run", *ddp, epochs=epochs)
    command = [*torchrun, str(SCRIPTS / "fit_and_evaluate.py"), str(folder / "results.json"), *args]
    return SimpleNamespace(folder=folder, epochs=epochs, running=beside.run(command, subprocess_env(), timeout=240))


@pytest.fixture(scope="session")
def fabric_fit_beside(beside, tiny_clip, demo_data, tmp_path_factory) -> SimpleNamespace:
    """`fabric run --accelerator cpu --devices 2 --strategy ddp $(which mst-clipiqa) fit ...` for 2 epochs, as a user
    types it: its run folder, its epochs, and the run to come (tests/test_launch.py)."""
    bin_dir = str(Path(sys.executable).parent)
    fabric, mst_clipiqa = shutil.which("fabric", path=bin_dir), shutil.which("mst-clipiqa", path=bin_dir)
    run_dir, epochs = tmp_path_factory.mktemp("fabric") / "run", 2
    args = cli_args(demo_data, tiny_clip, run_dir, epochs=epochs)

    def fit() -> subprocess.CompletedProcess:
        options = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--main-port", str(free_port())]
        return beside.finish([fabric, "run", *options, mst_clipiqa, "fit", *args], subprocess_env(), timeout=240)

    return SimpleNamespace(run_dir=run_dir, epochs=epochs, running=beside.call(fit))


@pytest.fixture(scope="session")
def rank_server_beside() -> None:
    """The fork server of `scripts.ranks.run_ranks`, started at the start of the session: it imports torch and the
    package while the tests run, before a test starts a process group (tests/test_metrics.py, tests/test_wandb.py)."""
    start_fork_server()


@pytest.fixture(scope="session")
def notebook_beside(beside, tmp_path_factory) -> tuple[Path, Future]:
    """notebooks/quickstart.ipynb run top to bottom, offline, in a fresh kernel, in a folder of its own: the folder,
    and the notebook with its outputs to come (tests/test_notebook.py)."""
    import nbformat
    from nbclient import NotebookClient

    folder = tmp_path_factory.mktemp("quickstart")
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    # The kernel inherits this process's environment: offline hub, offline W&B, the tests' feature cache.
    client = NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
    return folder, beside.call(client.execute)


@pytest.fixture(scope="session")
def paper_table_beside(beside, tmp_path_factory) -> tuple[Path, Future]:
    """perf/paper_table.py on AIGCIQA2023 at its least size (one prompt, 6 generators x 4 images), its three configs,
    2 splits of 1 epoch, with tiny towers: its working folder, and the run to come (tests/test_paper_table.py)."""
    workdir = tmp_path_factory.mktemp("paper-table") / "table"
    command = [sys.executable, str(ROOT / "perf" / "paper_table.py"), "--workdir", str(workdir), "--clip", "tiny",
               "--scale", "0.001", "--benchmarks", "aigciqa2023", "--splits", "2", "--epochs", "1", "--workers", "1",
               "--trainer.accelerator", "cpu"]  # fmt: skip
    return workdir, beside.run(command, subprocess_env())


TINY_HUB_TOWER = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, projection_dim=16
)
"""A tower small enough to write under the real CLIP ids in a test's hub cache."""

HUB_LOAD = (
    "import json; from mst_clipiqa.model import MSTCLIPIQA, ModelConfig; "
    "from mst_clipiqa.hub.saved_model import hub_commit; "
    "net = MSTCLIPIQA(ModelConfig(variant='prompt')); "
    "print(json.dumps({'patches': [net.encoder.coarse.config.patch_size, net.encoder.fine.config.patch_size], "
    "'tokens': net.prompt_encoder.tokenize(['a red cube'])[0].shape[1], "
    "'commits': [hub_commit(i, None) for i in "
    "('openai/clip-vit-base-patch32', 'openai/clip-vit-base-patch16')]}))"
)
"""The model's defaults load by the two ids, with the prompt head's tokenizer and text tower; what they loaded."""


@pytest.fixture(scope="session")
def hub_snapshot_beside(beside, tmp_path_factory) -> SimpleNamespace:
    """Tiny towers written as hub snapshots under openai/clip-vit-base-patch32 and -patch16
    (perf/standins.py), then loaded by id, offline, in a process of its own (`HUB_LOAD`): the cache,
    the snapshots, and the load to come (tests/test_paper_table.py)."""
    from standins import OPENAI_PATCHES, write_hub_snapshot

    cache = tmp_path_factory.mktemp("hub")
    text = dict(TINY_HUB_TOWER, max_position_embeddings=77)

    def vision(patch: int) -> dict:
        return dict(TINY_HUB_TOWER, image_size=224, patch_size=patch)

    snapshots = {
        repo_id: write_hub_snapshot(cache, repo_id, text, vision(patch), 0) for repo_id, patch in OPENAI_PATCHES.items()
    }
    env = subprocess_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    loading = beside.run([sys.executable, "-c", HUB_LOAD], env)
    return SimpleNamespace(cache=cache, snapshots=snapshots, text=text, vision=vision, loading=loading)


@pytest.fixture(scope="session")
def demo_command_beside(beside, tmp_path_factory) -> Future:
    """`mst-clipiqa demo` with 8 scenes and 2 epochs, run by its console script in a folder of its own, as the README's
    quick start runs it: the run to come (tests/test_readme.py)."""
    script = shutil.which("mst-clipiqa", path=str(Path(sys.executable).parent)) or "mst-clipiqa"
    folder = tmp_path_factory.mktemp("demo-command")
    command = [script, "demo", "--workdir", str(folder / "demo_run"), "--scenes", "8", "--trainer.max_epochs", "2",
               "--trainer.enable_progress_bar", "false"]  # fmt: skip
    return beside.run(command, dict(os.environ, PYTHONUNBUFFERED="1"), cwd=folder)
