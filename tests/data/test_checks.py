"""The setup check: every bad row and image of a table named in one error, or dropped with a report."""

import csv
import json
import logging
import re

import pandas as pd
import pytest
from PIL import Image
from release_fixtures import (
    AGIQA1K_ROWS,
    THREE_BAD_REASONS,
    make_agiqa1k,
    make_agiqa3k,
    make_aigiqa20k,
    make_table_release,
    make_three_bad_rows,
    write_bomb_png,
    write_image,
    write_table,
    write_truncated,
)

from mst_clipiqa.cli.commands import main
from mst_clipiqa.data.checks import check_dataset
from mst_clipiqa.data.releases import load_agiqa1k, load_agiqa3k, load_aigiqa20k
from mst_clipiqa.data.tables import Columns, load_table
from mst_clipiqa.demo.run import DEMO_CONFIG
from mst_clipiqa.errors import BadImageError, BadRowError

# ---------------------------------------------------------------------------------------------------------------------
# Bad data: every case as an error naming the item, and as a drop with a report
# ---------------------------------------------------------------------------------------------------------------------

GOOD = [("images/a.png", "a cat", 1.0), ("images/b.png", "a dog", 2.0), ("images/c.png", "a cow", 3.0)]


def missing_file(root):
    (root / "images" / "b.png").unlink()
    return GOOD


def truncated(root):
    write_truncated(root / "images" / "b.png")
    return GOOD


def bomb(root):
    write_bomb_png(root / "images" / "b.png")
    return GOOD


def nan_mos(root):
    return [GOOD[0], ("images/b.png", "a dog", "nan"), GOOD[2]]


def text_mos(root):
    return [GOOD[0], ("images/b.png", "a dog", "n/a"), GOOD[2]]


def empty_mos(root):
    return [GOOD[0], ("images/b.png", "a dog", ""), GOOD[2]]


def missing_prompt(root):
    return [GOOD[0], ("images/b.png", "  ", 2.0), GOOD[2]]


def duplicate(root):
    return [*GOOD, ("images/b.png", "a dog", 4.0)]


# (corrupt the release, the error class, what the message says about images/b.png, how many rows go)
BAD_CASES = {
    "missing file": (missing_file, BadImageError, "image file not found", 1),
    "truncated image": (truncated, BadImageError, "cannot decode image", 1),
    "decompression bomb": (bomb, BadImageError, "decompression bomb", 1),
    "NaN MOS": (nan_mos, BadRowError, "mos_quality is missing", 1),
    "non-numeric MOS": (text_mos, BadRowError, "mos_quality 'n/a' is not a number", 1),
    "empty MOS": (empty_mos, BadRowError, "mos_quality is missing", 1),
    "missing prompt": (missing_prompt, BadRowError, "prompt is missing", 1),
    "duplicate name": (duplicate, BadRowError, "name listed 2 times", 2),
}


def bad_release(root, case):
    """The GOOD release with images/b.png broken as `case` says, read with load_table."""
    corrupt = BAD_CASES[case][0]
    for i, (image, _, _) in enumerate(GOOD):
        write_image(root / image, shade=i)
    path = write_table(root / "labels.csv", pd.DataFrame(corrupt(root), columns=["image", "prompt", "mos"]))
    return load_table(path, Columns(image_column="image", mos_columns={"quality": "mos"}, prompt_column="prompt"))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_an_error_naming_the_image(tmp_path, case):
    _, error, reason, _ = BAD_CASES[case]
    ds = bad_release(tmp_path, case)
    with pytest.raises(error, match=r"labels|table") as info:
        check_dataset(ds, target="quality", need_prompt=True, num_threads=2)
    message = str(info.value)
    assert "labels.csv: " in message and "(rows numbered from 1, header not counted)" in message
    listed = [line for line in message.split("\n")[1:] if line.startswith("  images/b.png (row ")]
    assert len(listed) == BAD_CASES[case][3] and all(reason in line for line in listed)
    assert listed[0].startswith("  images/b.png (row 2): ")
    assert "images/a.png" not in message


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_dropped_with_a_report(tmp_path, case, caplog):
    _, _, reason, n_bad = BAD_CASES[case]
    ds = bad_release(tmp_path, case)
    report = tmp_path / "out" / "bad.csv"

    with caplog.at_level(logging.WARNING, logger="mst_clipiqa.data.checks"):
        kept = check_dataset(ds, target="quality", need_prompt=True, on_bad="drop", report_path=report)

    assert len(kept) == len(ds) - n_bad
    assert "images/b.png" not in kept["name"]
    assert f"{n_bad} bad rows of {len(ds)}" in caplog.text
    lines = list(csv.DictReader(report.open()))
    assert [line["name"] for line in lines] == ["images/b.png"] * n_bad
    assert all(reason in line["reason"] for line in lines)
    assert lines[0]["row"] == "2"


def test_bomb_below_twice_the_pixel_limit_is_caught_too(tmp_path, monkeypatch):
    # Pillow only warns between one and two times MAX_IMAGE_PIXELS; that warning must still count.
    for i, (image, _, _) in enumerate(GOOD):
        write_image(tmp_path / image, size=(8, 8) if i != 1 else (10, 10), shade=i)
    path = write_table(tmp_path / "labels.csv", pd.DataFrame(GOOD, columns=["image", "prompt", "mos"]))
    ds = load_table(path, Columns(image_column="image", mos_columns={"quality": "mos"}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80)
    with pytest.raises(BadImageError, match=r"images/b.png \(row 2\).*decompression bomb"):
        check_dataset(ds, target="quality", need_prompt=False, num_threads=4)


def test_cells_the_reader_cannot_take_are_kept_as_written_for_the_check(tmp_path):
    make_table_release(tmp_path, GOOD)
    frame = pd.DataFrame(GOOD, columns=["image", "prompt", "mos"]).assign(
        mos=["1.0", "good", "3.0"], align=["4.0", "5.0", "n/a"], part=["train", "holdout", "test"]
    )
    path = write_table(tmp_path / "labels.csv", frame)
    mapping = {"quality": "mos", "alignment": "align"}

    ds = load_table(path, Columns(image_column="image", mos_columns=mapping, split_column="part"))

    assert ds["mos_quality"] == [1.0, None, 3.0] and ds["split"] == ["train", None, "test"]
    assert ds["bad_cells"] == [
        None,
        {"mos_quality": "good", "mos_alignment": None, "mos_authenticity": None, "split": "holdout"},
        {"mos_quality": None, "mos_alignment": "n/a", "mos_authenticity": None, "split": None},
    ]
    with pytest.raises(BadRowError) as info:
        check_dataset(ds, target="quality", need_prompt=False)
    assert str(info.value).endswith(
        "\n  images/b.png (row 2): mos_quality 'good' is not a number; split 'holdout' is none of dev, test, train, "
        "val, valid, validation"
    )  # a bad cell of another target's column is no problem for this one
    kept = check_dataset(ds, target="quality", need_prompt=False, on_bad="drop", report_path=tmp_path / "r.csv")
    assert kept["name"] == ["images/a.png", "images/c.png"]
    assert "'good'" in (tmp_path / "r.csv").read_text()
    with pytest.raises(BadRowError, match=r"images/c.png \(row 3\): mos_alignment 'n/a' is not a number"):
        check_dataset(ds, target="alignment", need_prompt=False)


def test_every_problem_of_a_table_is_in_one_error_and_its_report(tmp_path):
    table = make_three_bad_rows(tmp_path)
    report = tmp_path / "run" / "dropped_rows.csv"
    ds = load_table(table, Columns(image_column="image", mos_columns={"quality": "mos"}))

    with pytest.raises(BadRowError) as info:
        check_dataset(ds, target="quality", need_prompt=False, report_path=report)

    message = str(info.value)
    assert message.startswith(f"{table}: 3 bad rows of 5 (rows numbered from 1, header not counted); all are listed "
                              f"in {report}. Fix them, or set on_bad to \"drop\" (--data.on_bad drop)")  # fmt: skip
    listed = dict(re.findall(r"\n  images/\w\.png \(row (\d+)\): ([^\n]*)", message))
    assert listed.keys() == THREE_BAD_REASONS.keys()
    assert all(listed[row].startswith(reason) for row, reason in THREE_BAD_REASONS.items())
    lines = list(csv.DictReader(report.open()))
    assert {line["row"]: line["reason"] for line in lines} == listed
    assert [line["name"] for line in lines] == ["images/b.png", "images/c.png", "images/d.png"]
    assert "'n/a'" in lines[0]["reason"]


def test_one_error_names_rows_of_every_kind(tmp_path):
    rows = [
        ("images/a.png", "a cat", 1.0),
        ("images/b.png", "a dog", "n/a"),
        ("images/c.png", "a cow", "?"),
        ("images/d.png", "", 2.0),
        ("images/e.png", "a pig", 3.0),
        ("images/e.png", "a pig", 4.0),
        ("images/f.png", "a hen", 5.0),
    ]
    table = make_table_release(tmp_path, rows)
    write_truncated(tmp_path / "images" / "f.png")
    ds = load_table(table, Columns(image_column="image", mos_columns={"quality": "mos"}, prompt_column="prompt"))

    with pytest.raises(BadRowError) as info:
        check_dataset(ds, target="quality", need_prompt=True, num_threads=2)

    *listed, broken = str(info.value).split("\n")[1:]
    assert listed == [
        "  images/b.png (row 2): mos_quality 'n/a' is not a number",
        "  images/c.png (row 3): mos_quality '?' is not a number",
        "  images/d.png (row 4): prompt is missing",
        "  images/e.png (row 5): name listed 2 times (rows 5, 6; mos_quality 3.0, 4.0)",
        "  images/e.png (row 6): name listed 2 times (rows 5, 6; mos_quality 3.0, 4.0)",
    ]
    assert broken.startswith("  images/f.png (row 7): cannot decode image")


def test_the_command_line_names_every_bad_row_once_and_leaves_the_report(tmp_path, tiny_clip, capsys):
    table = make_three_bad_rows(tmp_path / "data")
    run = tmp_path / "run"
    options = json.dumps({"image_column": "image", "mos_columns": {"quality": "mos"}})
    # `mst-clipiqa fit ...` in this process (tests/test_errors.py makes a data error in a process of its own).
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEMO_CONFIG), "--data.source", "table", "--data.root", str(table),
              "--data.source_options", options, "--data.protocol", "random",
              "--model.net.coarse_encoder", tiny_clip[0], "--model.net.fine_encoder", tiny_clip[1],
              "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    stderr = capsys.readouterr().err

    assert exit_info.value.code != 0
    (report,) = run.rglob("dropped_rows.csv")
    assert f"{table}: 3 bad rows of 5" in stderr and str(report) in stderr
    listed = re.findall(r"\n  images/\w\.png \(row (\d+)\): ([^\n]*)", stderr)
    assert [row for row, _ in listed] == list(THREE_BAD_REASONS)  # each once, in one message
    lines = list(csv.DictReader(report.open()))
    assert [(line["row"], line["reason"]) for line in lines] == listed
    assert "'n/a'" in lines[0]["reason"]


def test_agiqa1k_duplicate_listing_drops_both_copies(tmp_path):
    rows = [*AGIQA1K_ROWS, ("dreamStudio_8_9_1_1.jpg", "a bird", 2.0), ("dreamStudio_8_9_1_1.jpg", "a bird", 3.0)]
    ds = load_agiqa1k(make_agiqa1k(tmp_path, rows=rows))
    with pytest.raises(BadRowError, match=r"dreamStudio_8_9_1_1.jpg \(row 5\): name listed 2 times \(rows 5, 6;"):
        check_dataset(ds, target="quality", need_prompt=False)
    kept = check_dataset(ds, target="quality", need_prompt=False, on_bad="drop")
    assert kept["name"] == [name for name, _, _ in AGIQA1K_ROWS]


def test_withheld_labels_of_official_val_and_test_are_not_problems(tmp_path):
    ds = load_aigiqa20k(make_aigiqa20k(tmp_path))
    assert check_dataset(ds, target="quality", need_prompt=True) is ds
    # Without the official split the same missing MOS is a problem.
    unsplit = ds.map(lambda row: {"split": None})
    with pytest.raises(BadRowError, match="MJ_0003.png.*mos_quality is missing"):
        check_dataset(unsplit, target="quality", need_prompt=True, check_images=False)


def test_error_lists_the_first_problems_and_the_count(tmp_path):
    rows = [(f"images/{i:02d}.png", "a cat", None) for i in range(13)]
    table = make_table_release(tmp_path, rows)
    ds = load_table(table, Columns(image_column="image", mos_columns={"quality": "mos"}, prompt_column="prompt"))
    with pytest.raises(BadRowError) as info:
        check_dataset(ds, target="quality", need_prompt=True, report_path=tmp_path / "report.csv")
    message = str(info.value)
    assert "13 bad rows of 13" in message
    assert "images/09.png" in message and "images/10.png" not in message
    assert message.endswith("... and 3 more")
    assert len(list(csv.DictReader((tmp_path / "report.csv").open()))) == 13


def test_check_refuses_unknown_options(tmp_path):
    ds = load_agiqa3k(make_agiqa3k(tmp_path))
    with pytest.raises(ValueError, match="on_bad"):
        check_dataset(ds, target="quality", need_prompt=False, on_bad="ignore")
    with pytest.raises(ValueError, match="unknown target"):
        check_dataset(ds, target="beauty", need_prompt=False)
