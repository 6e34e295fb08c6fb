"""Scoring: the Python API (`load_scorer`) and the `mst-clipiqa score` command."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from mst_clipiqa.cli.commands import main
from mst_clipiqa.data.preprocess import ClipPreprocess, load_pixels
from mst_clipiqa.errors import BadImageError, BadRowError
from mst_clipiqa.scoring.scorer import load_scorer, score_files


@pytest.fixture(scope="module")
def models(saved_models):
    """variant → (the trained module, its saved folder)."""
    return saved_models


@pytest.fixture(scope="module")
def images(demo_data) -> list[Path]:
    return sorted((Path(demo_data) / "images").iterdir())[:5]


def assert_close(actual, expected) -> None:
    """Scores of the same images in differently composed batches agree to float32 rounding."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def module_scores(module, paths: list[Path], prompts: list[str] | None = None) -> list[float]:
    preprocess = ClipPreprocess.from_pretrained(module.net_config.coarse_encoder)
    batch = {"pixel_values": torch.stack([load_pixels(p, preprocess) for p in paths]), "prompt": prompts}
    with torch.no_grad():
        return module.net.to_mos(module(batch).score).tolist()


def test_scores_equal_the_modules_for_paths_images_and_tensors(models, images):
    module, folder = models["template"]
    expected = module_scores(module, images)
    scorer = load_scorer(folder, device="cpu")
    assert scorer.precision == "32" and scorer.mos_range == (20.0, 80.0) and not scorer.needs_prompt

    preprocess = ClipPreprocess.from_pretrained(module.net_config.coarse_encoder)
    pixels = torch.stack([load_pixels(p, preprocess) for p in images])
    for given in (images, [str(p) for p in images], [Image.open(p) for p in images], pixels, list(pixels)):
        assert scorer.score(given, batch_size=5) == expected
    assert_close(scorer.score(images, batch_size=2), expected)
    assert_close(scorer.score(images[0]), expected[:1])


def test_api_errors(models, images, tmp_path):
    template = load_scorer(models["template"][1], device="cpu")
    with pytest.raises(BadImageError, match="not found: .*missing.png"):
        template.score([images[0], tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="floating point of shape"):
        template.score(torch.zeros(3, 64, 64))
    with pytest.warns(UserWarning, match="does not read prompts"):
        template.score(images[:1], prompts=["ignored"])

    prompt = load_scorer(models["prompt"][1], device="cpu")
    with pytest.raises(BadRowError, match="one prompt per image"):
        prompt.score(images)
    with pytest.raises(BadRowError, match=r"no prompt for .*demo.* \(row 2 of 2\)"):
        prompt.score(images[:2], prompts=["a red cube", " "])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_command_scores_folders_and_lists_and_reports_each_bad_image(models, images, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    good = [shutil.copy(images[0], folder), shutil.copy(images[1], folder / "sub"), shutil.copy(images[2], folder)]
    (folder / "truncated.jpg").write_bytes(Path(images[3]).read_bytes()[:300])
    (folder / "not-an-image.png").write_text("hello")
    (folder / "notes.txt").write_text("not listed: not an image extension")
    out = tmp_path / "scores.csv"

    # On the CPU, in float32 like the scorer it is compared with (the command's default is bf16 on a GPU).
    main(["score", str(models["template"][1]), str(folder), "--out", str(out), "--batch_size", "2",
          "--accelerator", "cpu"])
    rows = {Path(row["image"]).name: row for row in read_csv(out)}
    assert list(next(iter(rows.values()))) == ["image", "score", "error"]
    assert sorted(rows) == sorted([Path(p).name for p in good] + ["truncated.jpg", "not-an-image.png"])
    for name in ("truncated.jpg", "not-an-image.png"):
        assert rows[name]["score"] == "" and f"cannot decode image {folder / name}" in rows[name]["error"]
    scorer = load_scorer(models["template"][1], device="cpu")
    for path in good:
        row = rows[Path(path).name]
        assert row["error"] == ""
        assert_close(float(row["score"]), scorer.score(path)[0])

    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\nin/{Path(good[0]).name}\n\nin/gone.png\n")
    listed = tmp_path / "s.jsonl"
    main(["score", str(models["template"][1]), str(listing), str(good[2]), "--out", str(listed),
          "--accelerator", "cpu"])
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == [f"in/{Path(good[0]).name}", "in/gone.png", str(good[2])]
    assert_close(lines[0]["score"], float(rows[Path(good[0]).name]["score"]))
    assert lines[1]["score"] is None and "not found" in lines[1]["error"]


def test_command_reads_prompts_from_a_table_and_names_a_row_without_one(models, images, tmp_path, capsys):
    module, folder = models["prompt"]
    for path in images[:3]:
        shutil.copy(path, tmp_path)
    names = [Path(p).name for p in images[:3]]
    prompts = ["a red cube", "two blue circles", "a green square"]
    pd.DataFrame({"file": names, "text": prompts}).to_parquet(tmp_path / "table.parquet")
    out = tmp_path / "scores.jsonl"

    main(["score", str(folder), str(tmp_path / "table.parquet"), "--out", str(out),
          "--image_column", "file", "--prompt_column", "text", "--accelerator", "cpu"])  # fp32, as module_scores
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["image"], line["prompt"], line["error"]) for line in lines] == [(n, p, None) for n, p in
                                                                                   zip(names, prompts)]
    assert [line["score"] for line in lines] == module_scores(module, images[:3], prompts)

    pd.DataFrame({"image": names, "prompt": ["a red cube", "", "a green square"]}).to_csv(tmp_path / "t.csv")
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(folder), str(tmp_path / "t.csv"), "--out", str(tmp_path / "x.csv")])
    assert exit_info.value.code == 1  # bad data, not a bad option
    assert f"score: error: no prompt for {tmp_path / names[1]} (row 2 of 3)" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_the_package_imports_light_and_exports_the_api():
    check = "import sys, mst_clipiqa; assert 'torch' not in sys.modules and 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)
    import mst_clipiqa
    from mst_clipiqa.scoring.scorer import Scorer

    assert mst_clipiqa.load_scorer is load_scorer and mst_clipiqa.Scorer is Scorer
    for name in mst_clipiqa.__all__:  # each public name resolves through the lazy map to an object
        assert getattr(mst_clipiqa, name) is not None, name


def test_compiled_towers_score_like_eager_ones_and_other_batch_sizes_run_eagerly(models, images, monkeypatch):
    module, folder = models["prompt"]
    prompts = [f"prompt {i}" for i in range(len(images))]
    expected = module_scores(module, images, prompts)
    scorer = load_scorer(folder, "cpu", compile=True)
    encoder = scorer.module.net.encoder
    compiled_batches = []  # batch sizes that went through a compiled tower

    def recording(compiled):
        return lambda *args, **kwargs: compiled_batches.append(len(kwargs["pixel_values"])) or compiled(*args, **kwargs)

    for tower in (encoder.coarse, encoder.fine):
        monkeypatch.setattr(tower, "_compiled_call_impl", recording(tower._compiled_call_impl))
    assert_close(scorer.score(images, prompts, batch_size=3), expected)  # 3 compiled, then the last 2 eagerly
    assert encoder.compiled_batch == 3 and compiled_batches == [3, 3]
    assert_close(scorer.score(images, prompts, batch_size=4), expected)  # no batch of 3: all eager
    assert compiled_batches == [3, 3]


def test_a_job_none_of_whose_images_can_be_scored_fails_and_one_with_some_succeeds(models, images, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"broken{i}.png").write_text("not an image")
    out = tmp_path / "scores.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(models["template"][1]), str(folder), "--out", str(out), "--accelerator", "cpu"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f"score: error: no image could be scored: all 3 failed; {out} names each reason" in error
    assert f"The first: cannot decode image {folder / 'broken0.png'}" in error
    assert [row["score"] for row in read_csv(out)] == ["", "", ""]  # the file still says why, row by row

    shutil.copy(images[0], folder)
    main(["score", str(models["template"][1]), str(folder), "--out", str(out), "--accelerator", "cpu",
          "--overwrite", "true"])  # fmt: skip
    assert "scored 1, failed 3" in capsys.readouterr().err


def test_image_root_points_a_table_and_a_list_at_the_images_folder(models, images, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    names = [Path(shutil.copy(path, folder)).name for path in images[:2]]
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "t.csv").write_text("image\n" + "".join(f"{name}\n" for name in names))
    (tables / "l.txt").write_text("".join(f"{name}\n" for name in names))
    model = str(models["template"][1])
    for given in ("t.csv", "l.txt"):
        out = tmp_path / f"{given}.csv"
        main(["score", model, str(tables / given), "--out", str(out), "--image_root", str(folder),
              "--accelerator", "cpu"])  # fmt: skip
        rows = read_csv(out)
        assert [(row["image"], row["error"]) for row in rows] == [(name, "") for name in names]
        assert_close([float(row["score"]) for row in rows], module_scores(models["template"][0], images[:2]))

    with pytest.raises(SystemExit) as exit_info:
        main(["score", model, str(tables / "t.csv"), "--out", str(tmp_path / "x.csv"), "--image_root",
              str(tmp_path / "nowhere")])  # fmt: skip
    assert exit_info.value.code == 1
    assert f"score: error: --image_root {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


def test_the_prompt_head_without_any_prompt_names_the_option_before_decoding(models, images, tmp_path, capsys,
                                                                              monkeypatch):  # fmt: skip
    import mst_clipiqa.scoring.scorer as scorer

    decoded = []
    monkeypatch.setattr(scorer, "load_pixels", lambda *args, **kwargs: decoded.append(args) or 1 / 0)
    for path in images[:3]:
        shutil.copy(path, tmp_path)
    (tmp_path / "table.csv").write_text("image,caption\n" + "".join(f"{Path(p).name},\n" for p in images[:3]))
    for given, options in ((tmp_path, []), (tmp_path / "table.csv", ["--prompt_column", "caption"])):
        with pytest.raises(SystemExit) as exit_info:
            main(["score", str(models["prompt"][1]), str(given), "--out", str(tmp_path / "x.csv"), *options])
        assert exit_info.value.code == 1
        error = capsys.readouterr().err
        assert f"score: error: {given}: none of its 3 images has a prompt" in error
        assert "--prompt_column COLUMN" in error and "--data.source_options.prompt_column COLUMN" in error
    assert decoded == [] and not (tmp_path / "x.csv").exists()


def test_score_files_without_inputs_says_there_are_no_images(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="no images in"):
        score_files(models["template"][1], [], tmp_path / "s.csv", accelerator="cpu")
