"""perf/paper_table.py end to end (stand-ins, every config of a benchmark through the runner, the table), and
the random towers of the real shapes it loads by hub id."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import torch
from scripts.beside import output_of
from standins import VIT_B_TEXT, VIT_B_VISION, write_hub_snapshot
from transformers import CLIPConfig, CLIPModel


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_the_table_of_one_benchmark_with_tiny_towers(paper_table_beside):
    # AIGCIQA2023 at its least size: one prompt, 6 generators x 4 images; its three configs, 2 splits of 1 epoch,
    # run beside the tests before this one (conftest.py).
    workdir, running = paper_table_beside
    output = output_of(running.result())

    cells = read_csv(workdir / "paper_table.csv")
    assert [(c["config"], c["target"], c["head"], c["splits"]) for c in cells] == [
        ("aigciqa2023_template", "quality", "A", "2"),
        ("aigciqa2023_prompt", "quality", "B", "2"),
        ("aigciqa2023_prompt_correspondence", "correspondence", "B", "2"),
    ]
    for cell in cells:
        assert -1 <= float(cell["median_srcc"]) <= 1 and -1 <= float(cell["median_plcc"]) <= 1
        assert float(cell["data_seconds"]) > 0 and float(cell["train_seconds"]) > 0
        assert float(cell["wall_seconds"]) >= float(cell["data_seconds"]) + float(cell["train_seconds"])
    # One encoder pass for the whole table: the first fit decodes and encodes the 24 images, every other fit reads
    # them from the shared cache; the one prompt is encoded once. A config's two splits train together, in one fit
    # whose counters are on its first split's row.
    runs = read_csv(workdir / "paper_table_runs.csv")
    assert [r["split"] for r in runs] == ["0", "1"] * 3
    assert [int(r["images_encoded"]) for r in runs] == [24, 0, 0, 0, 0, 0]
    assert [int(r["images_decoded"]) for r in runs] == [24, 0, 0, 0, 0, 0]
    assert [int(r["images_cached"]) for r in runs] == [0, 0, 24, 0, 24, 0]
    assert sum(int(r["prompts_encoded"]) for r in runs) == 1
    assert float(runs[0]["tower_seconds"]) > 0 and all(float(r["tower_seconds"]) == 0 for r in runs[3:])
    assert [float(r["train_seconds"]) > 0 for r in runs] == [True, False] * 3
    # The encoding pass runs inside the data phase, so it holds the seconds waiting for images and in the towers.
    first = runs[0]
    assert float(first["data_seconds"]) >= float(first["decode_wait_seconds"]) + float(first["tower_seconds"])

    table = (workdir / "paper_table.md").read_text(encoding="utf-8")
    assert table in output  # printed as well
    metrics = r"-?\d\.\d{4} / -?\d\.\d{4}"  # median SRCC / PLCC
    assert re.search(rf"^\| AIGCIQA2023 \| quality \| random, 2 splits \| {metrics} \| {metrics} \|$", table, re.M)
    assert re.search(rf"^\| AIGCIQA2023 \| correspondence \| random, 2 splits \| – \| {metrics} \|$", table, re.M)
    assert "draw the stand-ins (24 images" in table and "encode: towers (24 images, 1 prompts)" in table
    data_row = re.search(r"^\| data: read each release[^|]*\| (-?[\d.]+) \|", table, re.M)
    assert data_row and float(data_row.group(1)) >= 0  # the encoding pass's seconds are not counted twice
    assert (workdir / "runs" / "aigciqa2023_template" / "results.csv").is_file()  # the runner's own reports


def test_random_towers_have_openais_shapes():
    # OpenAI's checkpoints hold 151,277,313 and 149,620,737 parameters with their 49,408-token vocabulary.
    for patch, parameters in ((32, 151_277_313), (16, 149_620_737)):
        config = CLIPConfig(
            text_config=dict(VIT_B_TEXT, vocab_size=49408), vision_config=dict(VIT_B_VISION, patch_size=patch)
        )
        with torch.device("meta"):  # shapes only, no memory
            assert sum(p.numel() for p in CLIPModel(config).parameters()) == parameters


def test_a_hub_snapshot_loads_by_id_offline(hub_snapshot_beside):
    # The real shapes cost a gigabyte and a minute: the layout is checked with tiny towers under the same ids,
    # written at the start of the session and loaded beside the tests (conftest.py).
    hub = hub_snapshot_beside
    first = hub.snapshots["openai/clip-vit-base-patch32"]
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = write_hub_snapshot(hub.cache, "openai/clip-vit-base-patch32", hub.text, hub.vision(32), 0)
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten

    # The model's defaults name the two ids; the prompt head loads the tokenizer and the text tower too.
    result = hub.loading.result()
    output_of(result)  # fails the test unless the load exited with 0
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["patches"] == [32, 16]
    assert loaded["tokens"] == len("aredcube") + 2  # a token per character (spaces part words), BOS and EOS
    assert loaded["commits"] == [path.name for path in hub.snapshots.values()]


def test_the_table_holds_every_benchmark_config_with_its_protocols_splits(monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("paper_table", Path(__file__).parents[1] / "perf" / "paper_table.py")
    paper_table = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_table", paper_table)  # its dataclasses look their module up
    spec.loader.exec_module(paper_table)

    cells = paper_table.table_configs(list(paper_table.PREFIXES))
    assert {cell.source for cell in cells} == {"agiqa-1k", "agiqa-3k", "aigciqa2023", "aigiqa-20k", "evalmi-50k"}
    evalmi = [(c.name, c.target, c.variant, c.protocol, c.n_splits) for c in cells if c.source == "evalmi-50k"]
    assert evalmi == [
        ("evalmi50k_template", "quality", "template", "kfold", 5),
        ("evalmi50k_prompt", "quality", "prompt", "kfold", 5),
        ("evalmi50k_prompt_correspondence", "correspondence", "prompt", "kfold", 5),
    ]
    assert {(c.protocol, c.n_splits) for c in cells if c.source == "agiqa-3k"} == {("prompt", 10)}
