"""`mst-clipiqa score` at scale, as a user runs it: two DDP ranks write the file one process writes, and a job killed
with SIGKILL and rerun with `--resume true` scores only what it lacked and ends with the same file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scripts.runs import launch, one_thread, subprocess_env, wait_for

from mst_clipiqa.cli.commands import main

QUIET = ("--accelerator", "cpu", "--num_workers", "0")
VARIANTS = ("template", "prompt")


@pytest.fixture(scope="module")
def models(saved_models) -> dict[str, Path]:
    """Saved models of each head. The prompt head pads each batch's prompts to its longest, so its scores move in
    the last float32 digits with the batch's company; the template head's do not, and it checks files to 1e-6."""
    return {variant: saved_models[variant][1] for variant in VARIANTS}


def table_of_images(folder: Path, count: int, size: int, bad: tuple[int, ...] = ()) -> Path:
    """`count` noise images (rows in `bad` damaged) and a table naming each with a prompt, in a shuffled order."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        path = folder / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + i % 7, 3), dtype=np.uint8)).save(path)
        if i in bad:
            path.write_bytes(path.read_bytes()[:100])
        names.append(path.name)
    order = rng.permutation(count)  # input order is the table's, not the files'
    table = folder / "table.csv"
    table.write_text("image,prompt\n" + "".join(f"{names[i]},prompt number {i}\n" for i in order))
    return table


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [list(row) for row in got] == [["image", "score", "error"]] * len(want)
    assert [(row["image"], row["error"]) for row in got] == [(row["image"], row["error"]) for row in want]
    for g, w in zip(got, want):
        assert (g["score"] is None) == (w["score"] is None)
        if w["score"] is not None:
            # A batch with a bad row scores fewer images at once, which moves a float32 score by an ulp or so.
            assert g["score"] == pytest.approx(w["score"], rel=1e-6, abs=1e-6)


def test_two_ddp_ranks_write_the_file_one_process_writes(models, tmp_path):
    model = models["template"]
    table = table_of_images(tmp_path / "images", 13, 40, bad=(4,))  # 13 rows: one rank gets a row more
    one = tmp_path / "one.parquet"
    two = tmp_path / "two" / "scores.parquet"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with ThreadPoolExecutor(1) as pool:
        # No --devices: the two processes torchrun started are the two ranks.
        two_ranks = pool.submit(launch, [*torchrun, "-m", "mst_clipiqa", "score", str(model), str(table), "--out",
                                         str(two), "--batch_size", "2", *QUIET])  # fmt: skip
        # The one process is this one, meanwhile, on one thread as each rank: thread counts change float rounding.
        with one_thread():
            main(["score", str(model), str(table), "--out", str(one), "--batch_size", "2", *QUIET])
        output = two_ranks.result()
    rows = read_rows(one)
    assert len(rows) == 13 and sum(row["error"] is not None for row in rows) == 1
    assert output.count("scored 12, failed 1") == 1  # rank 0 reports, for both ranks
    assert_same_rows(read_rows(two), rows)
    assert not (two.parent / "scores.parquet.parts").exists()


def test_a_killed_job_resumes_where_it_stopped_and_ends_with_the_uninterrupted_file(models, tmp_path, capsys):
    model = models["template"]
    total = 300
    table = table_of_images(tmp_path / "images", total, 160, bad=(7, 150))
    out = tmp_path / "scores.jsonl"
    args = ["score", str(model), str(table), "--out", str(out), "--batch_size", "2", *QUIET]
    command = [sys.executable, "-m", "mst_clipiqa", *args]
    shard = tmp_path / "scores.jsonl.parts" / "rank00000.jsonl"
    log = tmp_path / "killed.log"

    def lines() -> int:
        return shard.read_bytes().count(b"\n") if shard.exists() else 0

    with log.open("w") as stream:
        process = subprocess.Popen(command, env=subprocess_env(), stdout=stream, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: lines() >= 20, process, log)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    done = lines()
    assert process.returncode == -signal.SIGKILL and not out.exists()
    assert done < total, "the job finished before it was killed: make its input slower"

    main([*args, "--resume", "true"])  # the rerun, in this process
    resumed = capsys.readouterr().err
    match = re.search(r"scored (\d+), failed (\d+) \((\d+) done before\)", resumed)
    assert match, resumed[-3000:]
    scored, failed, before = map(int, match.groups())
    assert before >= done and scored + failed + before == total  # only the missing rows were scored
    assert not (tmp_path / "scores.jsonl.parts").exists()

    uninterrupted = tmp_path / "uninterrupted.jsonl"
    main(["score", str(model), str(table), "--out", str(uninterrupted), "--batch_size", "2", *QUIET])
    want = read_rows(uninterrupted)
    assert_same_rows(read_rows(out), want)
    assert sum(row["error"] is not None for row in want) == 2


def test_a_run_without_resume_starts_afresh_and_resume_of_a_finished_job_rewrites_nothing(models, tmp_path, capsys):
    model = models["prompt"]
    table = table_of_images(tmp_path / "images", 5, 32)
    out = tmp_path / "scores.csv"
    stale = tmp_path / "scores.csv.parts"
    stale.mkdir()
    (stale / "rank00001.jsonl").write_text(json.dumps({"index": 0, "score": 1.0}) + "\n" + '{"index": 1, "sc')
    main(["score", str(model), str(table), "--out", str(out), *QUIET])  # the stale shard is not merged
    first, written = out.read_text(), out.stat().st_mtime_ns
    assert first.startswith("image,prompt,score,error\n") and first.count("\n") == 6 and not stale.exists()
    assert "scored 5, failed 0" in capsys.readouterr().err
    main(["score", str(model), str(table), "--out", str(out), *QUIET, "--resume", "true"])
    assert f"nothing to resume: {out} was completed" in capsys.readouterr().err
    assert out.read_text() == first and out.stat().st_mtime_ns == written
