"""`mst-clipiqa benchmark`: splits x variants, one encoder pass in all, reports on disk and in W&B (offline)."""

from __future__ import annotations

import csv
import gc
import json
import statistics
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI
from scripts.runs import cli_args

from mst_clipiqa.cli.commands import main

CONFIG = Path(__file__).parents[1] / "experiments" / "demo.yaml"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_three_splits_and_both_heads_cost_one_encoder_pass(demo_data, tiny_clip, tmp_path, capsys, monkeypatch):
    built = []  # the class of each CLI that builds a parser
    build = LightningCLI.setup_parser
    monkeypatch.setattr(
        LightningCLI, "setup_parser", lambda cli, *args: built.append(type(cli).__name__) or build(cli, *args)
    )
    frozen = []  # objects left out of each collection
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: frozen.append(gc.get_freeze_count()) or collect(*args))
    wandb_config = tmp_path / "wandb.yaml"
    wandb_config.write_text(
        "trainer:\n"
        "  logger:\n"
        "    class_path: lightning.pytorch.loggers.WandbLogger\n"
        "    init_args:\n"
        f"      save_dir: {tmp_path / 'runs'}\n"
        "      project: mst-clipiqa-test\n"
    )
    main(
        [
            "benchmark",
            "--config", str(CONFIG),
            "--config", str(wandb_config),
            "--splits", "3",
            "--variants", "template", "prompt",
            "--name", "demo-bench",
            "--output", str(tmp_path / "report"),
            "--data.root", demo_data,
            "--data.cache_dir", str(tmp_path / "cache"),
            "--model.net.coarse_encoder", tiny_clip[0],
            "--model.net.fine_encoder", tiny_clip[1],
            "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip

    runs = read_csv(tmp_path / "report" / "results.csv")
    assert [(r["variant"], r["split"]) for r in runs] == [(v, str(s)) for v in ("template", "prompt") for s in range(3)]
    assert built.count("_RunCLI") == 1  # six runs, one parser
    # What lived before the runs (the libraries) is left out of the collection after each run, and only then; garbage
    # is collected before the freeze, so an earlier benchmark's last run is not kept for good.
    assert len(frozen) >= 7 and frozen[0] == 0 and min(frozen[1:]) > 0 and gc.get_freeze_count() == 0
    images = 80  # the demo data: 16 scenes at 5 levels, every one in some part of each split
    encoded = [int(r["images_encoded"]) for r in runs]
    assert encoded == [images, 0, 0, 0, 0, 0]  # one encoder pass for the whole protocol
    assert all(int(r["images_cached"]) == images for r in runs[1:])
    assert [int(r["prompts_encoded"]) for r in runs] == [0, 0, 0, 16, 0, 0]  # once per distinct prompt
    assert all(Path(r["checkpoint"]).name.startswith("best") for r in runs)
    kept = {path.name.split("-")[0] for path in tmp_path.rglob("*.ckpt")}
    assert kept == {"best"}  # no last.ckpt: nothing resumes a benchmark's run

    summary = read_csv(tmp_path / "report" / "summary.csv")
    assert [(s["variant"], s["splits"]) for s in summary] == [("template", "3"), ("prompt", "3")]
    for row in summary:
        srcc = [float(r["srcc"]) for r in runs if r["variant"] == row["variant"]]
        assert abs(float(row["median_srcc"]) - statistics.median(srcc)) < 1e-9
        assert abs(float(row["mean_srcc"]) - statistics.fmean(srcc)) < 1e-9

    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "## Summary over splits" in markdown and markdown.count("| prompt | quality |") == 4
    assert "| template | quality | 3 |" in capsys.readouterr().out

    offline = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(offline) == 7  # one per fit, and the summary
    # Run folders are named by start second and a random id, so the summary run need not sort last: find it.
    (summary_run,) = [run for run in offline if list(run.glob("files/media/table/benchmark/summary_*.table.json"))]
    (summary_table,) = summary_run.glob("files/media/table/benchmark/summary_*.table.json")
    logged = json.loads(summary_table.read_text())
    assert logged["columns"][:3] == ["variant", "target", "splits"]
    assert [row[:3] for row in logged["data"]] == [["template", "quality", 3], ["prompt", "quality", 3]]
    (runs_table,) = summary_run.glob("files/media/table/benchmark/runs_*.table.json")
    assert len(json.loads(runs_table.read_text())["data"]) == 6


def test_a_runs_saved_config_configures_a_benchmark_and_score_and_export_say_what_they_take(
    demo_data, tiny_clip, tmp_path, capsys
):
    main(["fit", *cli_args(demo_data, tiny_clip, tmp_path / "run", epochs=1)])
    (saved,) = (tmp_path / "run").rglob("config.yaml")  # with the fit's own keys: ckpt_path, weights_only, ...
    main(["benchmark", "--config", str(saved), "--splits", "1", "--output", str(tmp_path / "report"),
          "--trainer.default_root_dir", str(tmp_path / "bench")])  # fmt: skip
    (run,) = read_csv(tmp_path / "report" / "results.csv")
    assert (run["variant"], run["split"]) == ("template", "0") and Path(run["checkpoint"]).is_file()
    # The run was a fit, and its own config.yaml configures the Trainer's commands as a fit's does.
    (run_config,) = Path(run["checkpoint"]).parents[1].glob("config.yaml")
    main(["validate", "--config", str(run_config), "--ckpt_path", run["checkpoint"]])

    (best,) = saved.parent.glob("checkpoints/best*.ckpt")
    for command, takes in (("export", f"export --ckpt_path {best} --out"), ("score", f"score {best} IMAGES")):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--config", str(saved)])
        assert exit_info.value.code == 2
        assert takes in capsys.readouterr().err


def test_cross_fills_the_train_by_test_matrix_over_the_configs(tiny_clip, tmp_path, monkeypatch):
    from standins import make_standins

    from mst_clipiqa.data.datamodule import IQADataModule

    # The configs' own data.root (data/AGIQA-1K, ...), relative to the working folder, hold stand-ins: 20, 20, 24 rows.
    monkeypatch.chdir(tmp_path)
    make_standins(tmp_path / "data", ["agiqa-1k", "agiqa-3k", "aigciqa2023"], scale=0.001, workers=1)
    tested = []  # (source, rows) of every evaluation loader
    loader = IQADataModule.loader

    def recording(data, rows, train):
        if not train:
            tested.append((data.hparams.source, len(rows)))
        return loader(data, rows, train)

    monkeypatch.setattr(IQADataModule, "loader", recording)
    experiments = CONFIG.parent
    main(
        [
            "benchmark",
            "--configs", str(experiments / "agiqa1k_template.yaml"), str(experiments / "agiqa3k_template.yaml"),
            "--cross", "agiqa-1k=data/AGIQA-1K", "agiqa-3k=data/AGIQA-3K", "aigciqa2023=data/AIGCIQA2023",
            "--splits", "1",
            "--name", "cross",
            "--output", str(tmp_path / "report"),
            "--data.cache_dir", str(tmp_path / "cache"),
            "--data.num_workers", "0",
            "--model.net.coarse_encoder", tiny_clip[0],
            "--model.net.fine_encoder", tiny_clip[1],
            "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false",
        ]
    )  # fmt: skip

    runs = read_csv(tmp_path / "report" / "cross.csv")
    assert [(r["source"], r["test_source"]) for r in runs] == [
        ("agiqa-1k", "agiqa-1k"),
        ("agiqa-1k", "agiqa-3k"),
        ("agiqa-1k", "aigciqa2023"),
        ("agiqa-3k", "agiqa-3k"),
        ("agiqa-3k", "agiqa-1k"),
        ("agiqa-3k", "aigciqa2023"),
    ]
    assert all(-1 <= float(r["srcc"]) <= 1 for r in runs)
    # A cross test reads every row of the other release; the own test, the split's test part (4 rows of 20).
    cross_tests = [t for t in tested if t[1] in (20, 24)]
    assert cross_tests == [("agiqa-3k", 20), ("aigciqa2023", 24), ("agiqa-1k", 20), ("aigciqa2023", 24)]
    # Each config keeps its own reports; the matrix of both sits beside them.
    own = read_csv(tmp_path / "report" / "agiqa3k_template" / "results.csv")
    assert len(own) == 1 and own[0]["srcc"] == runs[3]["srcc"]
    matrix = (tmp_path / "report" / "cross.md").read_text().splitlines()
    assert "| train | variant | target | agiqa-1k | agiqa-3k | aigciqa2023 |" in matrix
    row = next(line for line in matrix if line.startswith("| agiqa-3k | template | quality |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")][3:]
    assert cells[1] == f"{float(runs[3]['srcc']):.4f} / {float(runs[3]['plcc']):.4f} (own split)"
    assert cells[0] == f"{float(runs[4]['srcc']):.4f} / {float(runs[4]['plcc']):.4f}"


def test_cross_options_are_checked_before_any_run(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["benchmark", "--cross", "agiqa-1k", "--config", str(CONFIG)])
    assert exit.value.code == 2
    assert "--cross agiqa-1k: give each release as source=folder" in capsys.readouterr().err
