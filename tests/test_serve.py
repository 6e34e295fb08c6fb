"""`mst-clipiqa serve`: a real server process on a localhost port, talked to over HTTP as a client would."""

from __future__ import annotations

import base64
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from data.release_fixtures import write_bomb_png, write_truncated
from scripts.runs import free_port, subprocess_env

from mst_clipiqa.cli.commands import main

pytest.importorskip("litserve")

KEY = "test-key"
MAX_IMAGES = 8


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def descendants(pid: int) -> set[int]:
    """The processes `pid` started, and theirs (from /proc, as psutil would read them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        pid = todo.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found.update(children)
        todo += children
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has ended)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


class Server:
    """The server process and how to reach it."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path, root: Path):
        self.process, self.url, self.log, self.root = process, f"http://127.0.0.1:{port}", log, root

    def post(self, body=None, key: str | None = KEY, **kwargs) -> requests.Response:
        headers = {"X-API-Key": key} if key else {}
        return requests.post(f"{self.url}/predict", json=body, headers=headers, timeout=60, **kwargs)

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False


@pytest.fixture(scope="module")
def images(demo_data, tmp_path_factory) -> list[Path]:
    """Six demo images (JPEG and PNG) in the folder the server may read, beside a symlink that leads out of it."""
    root = tmp_path_factory.mktemp("served") / "root"
    root.mkdir()
    chosen = sorted((Path(demo_data) / "images").iterdir())[:6]
    for path in chosen:
        (root / path.name).write_bytes(path.read_bytes())
    outside = write_truncated(root.parent / "secret.jpg")
    (root / "escape.jpg").symlink_to(outside)
    return [root / path.name for path in chosen]


@pytest.fixture(scope="module")
def server(saved_models, images, tmp_path_factory) -> Server:
    """The prompt-head model served with a key from the environment, a folder of images, and small limits."""
    _, folder = saved_models["prompt"]
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    command = [
        sys.executable, "-m", "mst_clipiqa", "serve", str(folder), "--port", str(port), "--accelerator", "cpu",
        "--image_root", str(images[0].parent), "--max_images", str(MAX_IMAGES), "--max_request_mb", "1",
        "--batch_timeout", "0.05",
    ]  # fmt: skip
    with log.open("w") as out:  # its own process group, so that nothing it starts outlives a failed test
        process = subprocess.Popen(
            command,
            env=subprocess_env(MST_CLIPIQA_API_KEY=KEY),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Server(process, port, log, images[0].parent)
    try:
        deadline = time.monotonic() + 120
        while not served.healthy():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield served
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # stopped by the test, workers and all
        process.wait(30)


PROMPTS = ["a red cube", "two cats on a sofa", "a lighthouse at dusk", "an astronaut", "a bowl of fruit", "rain"]


@pytest.fixture(scope="module")
def table(images, tmp_path_factory) -> Path:
    """A table of the images and their prompts, for `mst-clipiqa score`."""
    work = tmp_path_factory.mktemp("scored")
    table = work / "table.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([("image", "prompt"), *zip(map(str, images), PROMPTS)])
    return table


def scored_file(saved_models, table: Path) -> list[float]:
    out = table.parent / "scores.csv"
    main(["score", str(saved_models["prompt"][1]), str(table), "--out", str(out), "--accelerator", "cpu"])
    with out.open() as f:
        return [float(row["score"]) for row in csv.DictReader(f)]


def test_served_scores_equal_the_score_command(server, saved_models, images, table):
    expected = scored_file(saved_models, table)
    as_json = server.post({"images": [b64(p.read_bytes()) for p in images], "prompts": PROMPTS})
    upload = [("image", (p.name, p.read_bytes(), "application/octet-stream")) for p in images]
    as_upload = requests.post(
        f"{server.url}/predict",
        files=upload,
        data={"prompt": PROMPTS},
        headers={"X-API-Key": KEY},
        timeout=60,
    )
    by_path = server.post({"paths": [p.name for p in images], "prompts": PROMPTS})
    one = server.post({"image": b64(images[2].read_bytes()), "prompt": PROMPTS[2]})
    for answer in (as_json, as_upload, by_path, one):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == "prompt" and body["mos_range"] == [20.0, 80.0]
        assert len(body["coarse_share"]) == len(body["scores"])
        assert all(0.0 < share < 1.0 for share in body["coarse_share"])
    # Batched as `score` batches them: the same figures. Alone, the image is in a batch of another size, whose
    # float32 rounding differs (by a few 1e-6 relative).
    for answer in (as_json, as_upload, by_path):
        assert answer.json()["scores"] == pytest.approx(expected, abs=1e-5)
    assert one.json()["scores"] == pytest.approx(expected[2:3], rel=1e-5)


def test_32_concurrent_clients_each_get_their_own_scores(server, images):
    alone = server.post({"images": [b64(p.read_bytes()) for p in images], "prompts": PROMPTS}).json()["scores"]

    def client(k: int) -> tuple[list[int], requests.Response]:
        picked = [(k + j) % len(images) for j in range(1 + k % 3)]
        body = {"images": [b64(images[i].read_bytes()) for i in picked], "prompts": [PROMPTS[i] for i in picked]}
        return picked, server.post(body)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(client, range(32)))
    for picked, answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["scores"] == pytest.approx([alone[i] for i in picked], rel=1e-5)


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("bad-images")
    return {
        "truncated": write_truncated(folder / "t.jpg").read_bytes(),
        "bomb": write_bomb_png(folder / "b.png").read_bytes(),
    }


def bad_requests(good: str, name: str, bad_images: dict[str, bytes]) -> dict[str, tuple]:
    """kind → (body, or raw bytes to send as is; the status; words of the reason)."""
    return {
        "not JSON": (b"{images: [", 400, "the body is not JSON (Expecting property name"),
        "not an object": ([good], 400, "not a JSON object"),
        "unknown field": ({"images": [good], "prompts": ["a"], "pics": 1}, 400, "unknown field 'pics'"),
        "no image": ({"prompts": ["a"]}, 400, "give one of image, images"),
        "empty list": ({"images": [], "prompts": []}, 400, "non-empty list"),
        "not base64": ({"images": [good, "%%%"], "prompts": ["a", "b"]}, 400, "image 2 of 2: not base64"),
        "broken image": (
            {"images": [good, b64(bad_images["truncated"])], "prompts": ["a", "b"]}, 422,
            "image 2 of 2: cannot decode image",
        ),
        "decompression bomb": ({"images": [b64(bad_images["bomb"])], "prompts": ["a"]}, 422, "decompression bomb"),
        "missing prompt": ({"images": [good, good], "prompts": ["a", None]}, 422, "no prompt for <bytes> (row 2"),
        "missing prompt by path": ({"paths": [name, name], "prompts": ["a", " "]}, 422, f"no prompt for {name} (row 2"),
        "no prompts": ({"images": [good]}, 422, "pass one prompt per image"),
        "prompt count": ({"images": [good, good], "prompts": ["a"]}, 400, "2 images but 1 prompts"),
        "too many images": (
            {"images": [good] * (MAX_IMAGES + 1), "prompts": ["a"] * (MAX_IMAGES + 1)}, 413, "at most 8",
        ),
        "body too large": ({"images": [b64(os.urandom(800_000))], "prompts": ["a"]}, 413, "exceeds 1048576 bytes"),
        "path outside": ({"paths": ["../secret.jpg"], "prompts": ["a"]}, 403, "outside the image folder"),
        "absolute path": ({"paths": ["/etc/hostname"], "prompts": ["a"]}, 403, "outside the image folder"),
        "symlink out": ({"paths": ["escape.jpg"], "prompts": ["a"]}, 403, "escape.jpg is outside"),
        "missing file": ({"paths": ["nope.png"], "prompts": ["a"]}, 422, "image file not found: nope.png"),
    }  # fmt: skip


def test_bad_requests_get_a_4xx_with_one_line_and_the_server_keeps_serving(server, images, bad_images):
    good = b64(images[0].read_bytes())
    cases = bad_requests(good, images[0].name, bad_images)

    def send(body):
        if isinstance(body, bytes):
            headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
            return requests.post(f"{server.url}/predict", data=body, headers=headers, timeout=60)
        return server.post(body)

    def good_request(_):
        return server.post({"images": [good], "prompts": [PROMPTS[0]]})

    # The bad requests and good ones at once, so that they share LitServe's batches.
    with ThreadPoolExecutor(8) as pool:
        goods = pool.map(good_request, range(16))
        answers = {kind: pool.submit(send, body) for kind, (body, _, _) in cases.items()}
        answers = {kind: future.result() for kind, future in answers.items()}
        goods = list(goods)
    for kind, (_, status, words) in cases.items():
        answer = answers[kind]
        detail = answer.json()["detail"]
        assert (answer.status_code, kind) == (status, kind), detail
        assert isinstance(detail, str) and "\n" not in detail and words in detail, (kind, detail)
    upload = [("picture", ("a.png", images[0].read_bytes(), "image/png"))]
    answer = requests.post(f"{server.url}/predict", files=upload, headers={"X-API-Key": KEY}, timeout=60)
    assert (answer.status_code, answer.json()["detail"]) == (
        400,
        "the upload: form field 'picture': upload images as 'image' files and prompts as 'prompt' fields",
    )
    # The same image in every good request: one score, up to the last float bits, which on a CPU depend on how many
    # images LitServe batched with it (the prompt head's products are blocked by batch size).
    scores = [answer.json()["scores"][0] for answer in goods]
    assert max(scores) - min(scores) < 1e-5
    assert all(answer.status_code == 200 for answer in goods)
    assert server.healthy() and server.process.poll() is None


def test_the_api_key_is_required(server, images):
    body = {"images": [b64(images[0].read_bytes())], "prompts": ["a"]}
    assert server.post(body, key=None).status_code == 401
    assert server.post(body, key="wrong").status_code == 401
    assert "API key" in server.post(body, key="wrong").json()["detail"]
    bearer = requests.post(f"{server.url}/predict", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert bearer.status_code == 200
    assert requests.get(f"{server.url}/info", timeout=5).status_code == 401
    # The health check and the API page answer without the key.
    assert server.healthy()
    assert "/predict" in requests.get(f"{server.url}/openapi.json", timeout=5).json()["paths"]


def test_sigterm_stops_the_server_and_its_workers(server):
    workers = descendants(server.process.pid)
    assert len(workers) >= 3  # the inference worker, the HTTP server, LitServe's manager
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    deadline = time.monotonic() + 30
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(workers)
    assert not server.healthy()


def test_a_missing_litserve_is_one_line(saved_models):
    code = (
        "import sys; sys.modules['litserve'] = None\n"
        "from mst_clipiqa.cli.commands import main, overview\n"
        "import mst_clipiqa.scoring.scorer  # the rest of the package does without LitServe\n"
        "assert 'serve' in overview()\n"
        f"main(['serve', {str(saved_models['template'][1])!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "mst-clipiqa serve: error: mst-clipiqa serve needs LitServe: pip install 'mst-clipiqa[serve]'"
    )


def test_a_wrong_model_is_one_line_before_any_worker(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path / "no-such-model"), "--port", str(free_port())])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("mst-clipiqa serve: error: ") and "Traceback" not in err, err


def test_a_port_in_use_is_one_line(saved_models, capsys):
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", str(saved_models["template"][1]), "--port", str(port)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"mst-clipiqa serve: error: --port {port}: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "choose another port"
    )
