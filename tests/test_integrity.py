"""Integrity and containment, as a user meets them: a damaged feature cache never changes a score, processes sharing
a cache encode each image once, a saved model folder reads nothing outside itself, and a file that cannot be read or
written ends in one line naming it (real files, real processes, kill -9 where it applies)."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from scripts.runs import SCRIPTS, subprocess_env

import mst_clipiqa.scoring.scorer as scorer
from mst_clipiqa.cli.commands import main
from mst_clipiqa.data import features
from mst_clipiqa.data.features import Claims, TableFeatures
from mst_clipiqa.data.preprocess import ClipPreprocess
from mst_clipiqa.data.tables import load_source
from mst_clipiqa.model import MSTCLIPIQA, ModelConfig

QUIET = ("--accelerator", "cpu", "--num_workers", "0")
NOBODY = 65534


@pytest.fixture(scope="module")
def model(saved_models) -> Path:
    return saved_models["template"][1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32 + i, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def scores(path: Path) -> list[tuple[str, float]]:
    with path.open(newline="") as file:
        return [(row["image"], float(row["score"])) for row in csv.DictReader(file)]


def assert_same_scores(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [name for name, _ in got] == [name for name, _ in want]
    # Rows scored in other batches: equal to float32 rounding (the scale is 20..80).
    assert [score for _, score in got] == pytest.approx([score for _, score in want], rel=1e-6, abs=1e-5)


def run_main(args: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status of `mst-clipiqa ARGS` in this process, and the lines it printed to stderr that are not progress."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if "error" in line or "Traceback" in line]


def run_command(args: list[str], *, prefix: tuple[str, ...] = (), fsize: int | None = None) -> tuple[int, list[str]]:
    """Exit status of `mst-clipiqa ARGS` in a process of its own (under `prefix`, with a file-size limit), and the
    lines of its stderr that report an error or a traceback."""

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    command = [*prefix, sys.executable, "-m", "mst_clipiqa.cli.commands", *args]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240, preexec_fn=limit)
    return done.returncode, [line for line in done.stderr.splitlines() if "error" in line or "Traceback" in line]


def another_user() -> tuple[str, ...]:
    """A command prefix under which what `take_away` made unreadable or read-only is so: root without the
    capabilities that let it read and write every file (setpriv), or this user as is."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("root, and no setpriv to run a command without the right to read and write every file")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")


def take_away(path: Path) -> None:
    """Make a file unreadable, or a folder read-only, for `another_user()`: owned by nobody, 0600 or 0755, as another
    account's files are (for a user who is not root: mode 0 or 0555 on the user's own)."""
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
        path.chmod(0o755 if path.is_dir() else 0o600)
    else:
        path.chmod(0o555 if path.is_dir() else 0)


# ---- the feature cache ---------------------------------------------------------------------------------------------


def damage(shard: Path, how: str) -> None:
    arrow = max(shard.glob("*.arrow"), key=lambda path: path.stat().st_size)
    data = bytearray(arrow.read_bytes())
    if how == "overwritten":
        middle = len(data) // 2
        data[middle - 128 : middle + 128] = bytes(256)
    else:
        data = data[: len(data) // 2]
    arrow.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["overwritten", "cut in half"])
def test_a_damaged_shard_is_named_and_encoded_again_and_no_score_changes(model, images, tmp_path, monkeypatch, how):
    monkeypatch.setattr(features, "SHARD_SIZE", 4)  # 3 shards per tower
    cache = tmp_path / "cache"

    def score(out: str) -> dict:
        options = dict(accelerator="cpu", num_workers=0, batch_size=4, features=True, cache_dir=cache)
        return scorer.score_files(model, [str(images)], tmp_path / out, **options)

    assert score("first.csv")["cached"] == 0
    coarse = min(cache.glob("image-*"))
    shard = sorted(coarse.glob("shard-*"))[1]
    damage(shard, how)

    with pytest.warns(UserWarning, match=f"feature cache shard {shard} is damaged") as warned:
        report = score("second.csv")
    assert "encoded again" in str(warned[0].message)
    assert report["cached"] == 8 and report["scored"] == 12  # the damaged shard's 4 images are encoded again
    assert_same_scores(scores(tmp_path / "second.csv"), scores(tmp_path / "first.csv"))
    assert not shard.exists() and len(list(coarse.glob("damaged-*"))) == 1 and len(list(coarse.glob("shard-*"))) == 3
    assert score("third.csv")["cached"] == 12


def prepared(demo_data: str, clip, cache: Path) -> TableFeatures:
    """The demo table's features, as a fit prepares them (the network of scripts/encode_features.py)."""
    table = load_source("agiqa-3k", demo_data)
    torch.manual_seed(0)
    net = MSTCLIPIQA(ModelConfig(coarse_encoder=clip[0], fine_encoder=clip[1])).eval()
    ready = TableFeatures(table, ClipPreprocess.from_pretrained(clip[0]), cache_dir=cache, batch_size=8)
    ready.prepare(range(len(table)), net)
    return ready


def test_a_fit_encodes_a_damaged_shards_images_again(demo_data, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "SHARD_SIZE", 32)
    clean = prepared(demo_data, tiny_clip, tmp_path / "cache")
    shards = min((tmp_path / "cache").glob("image-*")).glob("shard-*")  # 32, 32 and 16 images
    damage(max(shards, key=lambda shard: sum(file.stat().st_size for file in shard.glob("*.arrow"))), "overwritten")
    with pytest.warns(UserWarning, match="is damaged"):
        again = prepared(demo_data, tiny_clip, tmp_path / "cache")
    assert again.stats.images_encoded == 32 and again.stats.images_cached == 80 - 32
    assert torch.equal(again.coarse_embeds, clean.coarse_embeds) and torch.equal(again.fine_embeds, clean.fine_embeds)


def encode(result: Path, demo_data: str, clip, cache: Path, *options: str) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPTS / "encode_features.py"), str(result), demo_data, *clip, str(cache)]
    return subprocess.Popen([*command, *options], env=subprocess_env(), stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]


def test_two_processes_on_one_empty_cache_encode_each_image_once(demo_data, tiny_clip, tmp_path):
    cache, ready = tmp_path / "cache", [tmp_path / "ready0", tmp_path / "ready1"]
    start = tmp_path / "start"
    processes = [
        encode(tmp_path / f"result{i}.pt", demo_data, tiny_clip, cache, "--shard-size", "16",
               "--ready", str(ready[i]), "--start", str(start))
        for i in range(2)
    ]  # fmt: skip
    deadline = time.monotonic() + 180
    while not all(path.exists() for path in ready):  # both loaded: they start encoding at the same moment
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline
        time.sleep(0.05)
    start.touch()
    for process in processes:
        finished(process)

    results = [torch.load(tmp_path / f"result{i}.pt") for i in range(2)]
    assert results[0]["encoded"] + results[1]["encoded"] == 80  # 80 images, each through the towers once
    for namespace in cache.glob("image-*"):
        assert len(list(namespace.glob("shard-*"))) == 5, namespace  # 80 images in shards of 16, none twice
    assert torch.equal(results[0]["coarse"], results[1]["coarse"]) and torch.equal(
        results[0]["fine"], results[1]["fine"]
    )
    assert not list((cache / "claims").iterdir())


def test_a_claim_of_a_process_killed_with_sigkill_is_taken_over(demo_data, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    slow = encode(tmp_path / "killed.pt", demo_data, tiny_clip, cache, "--shard-size", "16", "--slow", "0.5")
    try:
        deadline = time.monotonic() + 180
        while not (cache / "claims").is_dir() or not list((cache / "claims").iterdir()):
            assert slow.poll() is None and time.monotonic() < deadline, "the slow process ended before it claimed"
            time.sleep(0.02)
        os.kill(slow.pid, signal.SIGKILL)  # it holds a claim, maybe mid-write
    finally:
        slow.kill()
        slow.communicate()
    assert list((cache / "claims").iterdir())  # left behind by the killed process
    spaces = cache.glob("image-*")
    coarse_config = features.checkpoint_content(tiny_clip[0], None)["config"]  # namespaces name towers by content
    (coarse,) = [space for space in spaces if coarse_config in (space / "spec.json").read_text()]
    stored = sum(datasets.load_from_disk(str(shard)).num_rows for shard in coarse.glob("shard-*"))

    rerun = encode(tmp_path / "rerun.pt", demo_data, tiny_clip, cache, "--shard-size", "16")
    finished(rerun)
    got, clean = torch.load(tmp_path / "rerun.pt"), prepared(demo_data, tiny_clip, tmp_path / "clean-cache")
    assert torch.equal(got["coarse"], clean.coarse_embeds) and torch.equal(got["fine"], clean.fine_embeds)
    assert got["encoded"] == 80 - stored and not list((cache / "claims").iterdir())


def test_a_claim_from_another_machine_is_waited_for_until_it_is_stale(tmp_path):
    claims = Claims(tmp_path)
    claims.folder.mkdir()
    claim = claims.folder / "images-x"
    claim.write_text(json.dumps({"host": "another-node", "pid": 1, "token": "t"}))
    assert claims.take("images-x") is None and claims.held("images-x")  # renewed just now: alive
    old = time.time() - features.CLAIM_STALE_SECONDS - 1
    os.utime(claim, (old, old))
    with claims.take("images-x") as taken:  # not renewed for too long: its owner is gone
        assert json.loads(taken.path.read_text())["pid"] == os.getpid()
    assert not claim.exists()


# ---- model folders -------------------------------------------------------------------------------------------------


def edited(model: Path, folder: Path, edit) -> Path:
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def outside_encoders(tiny_clip, where: str):
    def edit(config: dict) -> None:
        if where == "hub_id":
            config["encoders"]["coarse"] = {"hub_id": tiny_clip[0]}
        elif where == "hub_id, relative":
            config["encoders"]["coarse"] = {"hub_id": os.path.relpath(tiny_clip[0])}
        else:
            del config["encoders"]
            config["net"].update(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1])

    return edit


@pytest.mark.parametrize("where", ["hub_id", "hub_id, relative", "net.coarse_encoder"])
def test_an_encoder_outside_the_model_folder_is_refused_in_one_line(model, images, tiny_clip, tmp_path, capsys, where):
    folder = edited(model, tmp_path / "model", outside_encoders(tiny_clip, where))
    code, lines = run_main(["score", str(folder), str(images), "--out", str(tmp_path / "s.csv"), *QUIET], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert (
        f"{folder / 'config.json'}: the coarse encoder" in lines[0] and "reads no file outside its folder" in lines[0]
    )
    assert not (tmp_path / "s.csv").exists()


def test_the_refusal_comes_before_any_file_outside_is_opened(model, images, tiny_clip, tmp_path):
    folder = edited(model, tmp_path / "model", outside_encoders(tiny_clip, "hub_id"))
    watch = (
        "import json, sys\n"
        "opened = []\n"
        "sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == 'open' else None)\n"
        "from mst_clipiqa.cli.commands import main\n"
        "try:\n"
        f"    main({['score', str(folder), str(images), '--out', str(tmp_path / 's.csv'), *QUIET]!r})\n"
        "except SystemExit as exit_info:\n"
        "    print(json.dumps([exit_info.code, opened]))\n"
    )
    done = subprocess.run([sys.executable, "-c", watch], env=subprocess_env(), capture_output=True, text=True)
    code, opened = json.loads(done.stdout.splitlines()[-1])
    assert code == 1 and "reads no file outside its folder" in done.stderr
    assert any(path.startswith(str(folder)) for path in opened)  # the hook sees the folder's own files
    assert not [path for path in opened if path.startswith(tiny_clip[0])]


@pytest.mark.parametrize("entry", ["/etc", "../", "symlink out"])
def test_folder_entries_that_leave_the_model_are_still_refused(model, images, tiny_clip, tmp_path, capsys, entry):
    def edit(config: dict) -> None:
        config["encoders"]["coarse"] = {"folder": "encoders/link" if entry == "symlink out" else entry}

    folder = edited(model, tmp_path / "model", edit)
    (folder / "encoders" / "link").symlink_to(tiny_clip[0])
    code, lines = run_main(["score", str(folder), str(images), "--out", str(tmp_path / "s.csv"), *QUIET], capsys)
    assert code == 1 and len(lines) == 1 and "the coarse encoder is missing or incomplete" in lines[0], lines


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_encoder_weights_are_named_and_never_run(model, images, tmp_path, capsys):
    folder = Path(shutil.copytree(model, tmp_path / "model"))
    marker = tmp_path / "payload-ran"
    (folder / "encoders" / "coarse" / "model.safetensors").unlink()
    torch.save({"weight": Payload(marker)}, folder / "encoders" / "coarse" / "pytorch_model.bin")
    code, lines = run_main(["score", str(folder), str(images), "--out", str(tmp_path / "s.csv"), *QUIET], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert (
        f"{folder / 'encoders' / 'coarse' / 'pytorch_model.bin'}: the coarse encoder's weights are a pickle" in lines[0]
    )
    assert not marker.exists()


def test_a_file_the_user_cannot_read_is_reported_as_permission_denied(model, images, tmp_path):
    prefix = another_user()
    folder = Path(shutil.copytree(model, tmp_path / "model"))
    weights = folder / "encoders" / "coarse" / "model.safetensors"
    take_away(weights)
    code, lines = run_command(
        ["score", str(folder), str(images), "--out", str(tmp_path / "s.csv"), *QUIET], prefix=prefix
    )
    assert code == 1 and len(lines) == 1, lines
    assert f"permission denied: {weights}" in lines[0] and "No such file" not in lines[0]


@pytest.mark.parametrize("typed", ["inhose-model", "./inhose-model"])
def test_a_mistyped_model_folder_says_no_such_folder_before_the_hub(images, tmp_path, monkeypatch, capsys, typed):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, lines = run_main(["score", typed, str(images), "--out", "s.csv", *QUIET], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert f"no such model folder or checkpoint: {typed} (looked in {tmp_path / 'inhose-model'})" in lines[0]
    if typed == "inhose-model":  # a hub id too: the hub comes after
        assert lines[0].index("no such model folder") < lines[0].index("the hub could not be reached")


# ---- output files --------------------------------------------------------------------------------------------------


def test_an_existing_output_is_not_replaced_without_resume_or_overwrite(model, images, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    args = ["score", str(model), str(images), "--out", str(out), *QUIET]
    assert run_main(args, capsys)[0] == 0
    first, written = out.read_text(), out.stat().st_mtime_ns
    code, lines = run_main(args, capsys)
    assert code == 2 and len(lines) == 1 and f"--out {out} exists" in lines[0], lines
    assert "--resume true" in lines[0] and "--overwrite true" in lines[0]
    assert out.read_text() == first and out.stat().st_mtime_ns == written
    assert run_main([*args, "--overwrite", "true"], capsys)[0] == 0 and out.stat().st_mtime_ns != written
    assert out.read_text() == first


def test_a_read_only_output_folder_is_one_line(model, images, tmp_path):
    prefix = another_user()
    folder = tmp_path / "read-only"
    folder.mkdir()
    take_away(folder)
    code, lines = run_command(["score", str(model), str(images), "--out", str(folder / "s.csv"), *QUIET], prefix=prefix)
    assert code == 1 and len(lines) == 1, lines
    assert f"cannot write {folder / 's.csv.parts'}" in lines[0] and "permission denied" in lines[0]


def test_a_file_size_limit_is_one_line_and_resume_completes_the_file(model, images, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    args = ["score", str(model), str(images), "--out", str(out), *QUIET, "--batch_size", "2"]
    code, lines = run_command(args, fsize=600)  # room for a few rows of the shard
    assert code == 1 and len(lines) == 1, lines
    assert f"cannot write {out}.parts/rank00000.jsonl: file too large" in lines[0] and "--resume true" in lines[0]
    assert 0 < len(scorer.done_rows(out)) < 12
    assert run_main([*args, "--resume", "true"], capsys)[0] == 0
    assert run_main([*args[:3], "--out", str(tmp_path / "whole.csv"), *QUIET], capsys)[0] == 0
    assert_same_scores(scores(out), scores(tmp_path / "whole.csv"))


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB file system (tmpfs), where root may mount one."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a small file system needs root")
    if subprocess.run([mount, "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("this machine does not let root mount a tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_resume_completes_the_file_once_there_is_room(
    model, images, tmp_path, small_disk, capsys
):
    out = small_disk / "scores.csv"
    args = ["score", str(model), str(images), "--out", str(out), *QUIET]
    (small_disk / "filler").write_bytes(b"x" * 12 * 1024)
    code, lines = run_main(args, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert f"cannot write {out}" in lines[0] and "no space left on device" in lines[0] and "--resume true" in lines[0]
    assert not out.exists()
    (small_disk / "filler").unlink()  # space freed
    assert run_main([*args, "--resume", "true"], capsys)[0] == 0
    assert run_main([*args[:3], "--out", str(tmp_path / "whole.csv"), *QUIET], capsys)[0] == 0
    assert_same_scores(scores(out), scores(tmp_path / "whole.csv"))
