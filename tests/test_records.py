"""What a run records is what ran: its config.yaml names the settings the run used, and reruns it (offline)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import yaml
from scripts.models import trained_module
from scripts.runs import cli_args, in_process, one_thread, subprocess_env

from mst_clipiqa.cli.trainer import MSTCLIPIQACLI
from mst_clipiqa.demo.run import DEMO_CONFIG
from mst_clipiqa.hub.pretrained import save_pretrained
from mst_clipiqa.model import ModelConfig
from mst_clipiqa.training.checkpoints import read_checkpoint


def test_a_fit_from_a_saved_model_records_the_settings_it_took_and_its_config_reruns_it(tiny_clip, demo_data, tmp_path):
    folder = save_pretrained(trained_module(tiny_clip, tau_init=3.0, fusion_dim=64), tmp_path / "model")
    args = [
        "--data.source",
        "agiqa-3k",
        "--data.root",
        demo_data,
        "--data.batch_size",
        "16",
        "--data.num_workers",
        "0",
        "--model.init_from",
        str(folder),
        "--trainer.max_epochs",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "first"),
    ]
    # fmt: skip
    with one_thread():
        first = in_process("fit", args)
    recorded = Path(first.trainer.log_dir) / "config.yaml"
    net = yaml.safe_load(recorded.read_text())["model"]["net"]
    used = first.model.net_config
    assert (used.tau_init, used.fusion_dim) == (3.0, 64) and used.coarse_encoder != ModelConfig().coarse_encoder
    assert net == {key: getattr(used, key) for key in net}

    # Offline (the tests' HF_HUB_OFFLINE=1), as written: the same settings, the same weights.
    with one_thread():
        again = in_process("fit", ["--config", str(recorded), "--trainer.default_root_dir", str(tmp_path / "again")])
    assert again.model.net_config == used
    assert yaml.safe_load((Path(again.trainer.log_dir) / "config.yaml").read_text())["model"]["net"] == net
    weights = [read_checkpoint(cli.trainer.checkpoint_callback.last_model_path)["state_dict"] for cli in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_a_strategy_left_to_auto_is_recorded_as_the_one_used(tiny_clip, demo_data, tmp_path, monkeypatch):
    # What `fabric run --accelerator cpu --devices 2` (no --strategy) tells the command, as seen before it launches.
    monkeypatch.setenv("LT_ACCELERATOR", "cpu")
    monkeypatch.setenv("LT_DEVICES", "2")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = MSTCLIPIQACLI(args=cli_args(demo_data, tiny_clip, tmp_path, epochs=1), run=False)
    assert cli.trainer.num_devices == 2
    assert (cli.config["trainer"]["strategy"], cli.config["trainer"]["devices"]) == ("ddp", 2)
    monkeypatch.setenv("LT_DEVICES", "1")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = MSTCLIPIQACLI(args=cli_args(demo_data, tiny_clip, tmp_path, epochs=1), run=False)
    assert cli.config["trainer"]["strategy"] == "auto"  # one device: nothing was chosen that a rerun would not


def test_a_fit_prints_what_its_user_needs_and_no_third_party_noise(tiny_clip, demo_data, tmp_path):
    # The demo's config less its choices of logger and model summary: Lightning's defaults (without tensorboard, a
    # CSVLogger) but for what the command sets.
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    del config["trainer"]["logger"], config["trainer"]["enable_model_summary"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = cli_args(demo_data, tiny_clip, tmp_path, epochs=1)
    args[args.index(str(DEMO_CONFIG))] = str(tmp_path / "config.yaml")
    at = args.index("--trainer.logger.init_args.save_dir")
    del args[at : at + 2]  # the default logger writes under --trainer.default_root_dir, given too
    console = shutil.which("mst-clipiqa", path=str(Path(sys.executable).parent))
    run = subprocess.run([console, "fit", *args], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    said = run.stdout + run.stderr
    assert run.returncode == 0, said[-3000:]
    assert "MST-CLIPIQA (template head):" in said and "trainable" in said
    for noise in ("Tip:", "litlogger", "LeafSpec", "tensorboardX", "Trainable params", "┃ Name"):
        assert noise not in said, said
