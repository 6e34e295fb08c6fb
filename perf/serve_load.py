"""`mst-clipiqa serve` under load against offline `mst-clipiqa score` of the same images, in one run, on localhost.

    python perf/serve_load.py WORKDIR                                    # tiny towers, CPU, 1/8/32 clients
    python perf/serve_load.py WORKDIR --towers real --requests 64        # ViT-B/32 + B/16 shapes (slow on a CPU)
    python perf/serve_load.py WORKDIR --accelerator cuda --devices 1 --scenes 400 --requests 2000   # a GPU machine

Offline `score` runs first and last (its predict loop's images/s, `score_files`' own figure, model loading left
out); between them the server runs, and each client count sends `--requests` requests of `--per_request` images
each, every client one request at a time on its own connection, stopped early after `--seconds`. Latency is each
request's, from send to answer. Every server option after the known ones goes to `mst-clipiqa serve`. The server
listens on 127.0.0.1 only; `uptime` is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from score_engine import random_model

KEY = "load-test"


def offline(model: Path, images: list[Path], out: Path, accelerator: str, devices: str) -> float:
    """`score`'s images/s on the images (its predict loop), in this process."""
    from mst_clipiqa.scoring.scorer import score_files

    listing = out.with_suffix(".txt")
    listing.write_text("\n".join(map(str, images)))
    devices_option = int(devices) if devices.isdigit() else devices
    report = score_files(model, [str(listing)], out, accelerator=accelerator, devices=devices_option)
    return report["images_per_s"]


def load(url: str, bodies: list[str], clients: int, requests_total: int, seconds: float) -> tuple[float, list, int]:
    """(images/s, request latencies in s, images scored) of `clients` clients sending `requests_total` requests."""
    lock = threading.Lock()
    sent = 0
    latencies: list[float] = []
    images = 0
    failures: list[str] = []
    deadline = time.perf_counter() + seconds

    def client() -> None:
        nonlocal sent, images
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                with lock:
                    if sent >= requests_total:
                        return
                    body, sent = bodies[sent % len(bodies)], sent + 1
                start = time.perf_counter()
                answer = session.post(url, data=body, headers={"X-API-Key": KEY}, timeout=600)
                took = time.perf_counter() - start
                with lock:
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code} {answer.text[:200]}")
                        return
                    latencies.append(took)
                    images += len(answer.json()["scores"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, the first: {failures[0]}")
    return images / wall, latencies, images


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--scenes", type=int, default=40, help="demo scenes, 5 images each")
    parser.add_argument("--towers", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="requests per client count, at most")
    parser.add_argument("--per_request", type=int, default=1, help="images per request")
    parser.add_argument("--seconds", type=float, default=60, help="time per client count, at most")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--port", type=int, default=18931)
    args, serve_options = parser.parse_known_args()
    work = args.workdir
    os.environ.setdefault("HF_HUB_CACHE", str(work / "hub"))
    os.environ["HF_HUB_OFFLINE"] = "1"

    from mst_clipiqa.demo.synthetic import make_demo_dataset

    model = random_model(work, args.towers)
    images = sorted((make_demo_dataset(work / "demo", n_scenes=args.scenes) / "images").iterdir())
    print(f"uptime at the start: {os.popen('uptime').read().strip()}")
    print(f"{len(images)} images, model {model.name}, {args.per_request} per request")
    before = offline(model, images, work / "offline-before.csv", args.accelerator, args.devices)

    encoded = [base64.b64encode(p.read_bytes()).decode("ascii") for p in images]
    bodies = []
    for start in range(0, len(encoded), args.per_request):
        chunk = encoded[start : start + args.per_request]
        bodies.append('{"images": ["' + '", "'.join(chunk) + '"]}')
    command = [
        sys.executable, "-m", "mst_clipiqa", "serve", str(model), "--port", str(args.port),
        "--accelerator", args.accelerator, "--devices", args.devices, *serve_options,
    ]  # fmt: skip
    server = subprocess.Popen(command, env={**os.environ, "MST_CLIPIQA_API_KEY": KEY})
    url = f"http://127.0.0.1:{args.port}"
    rows = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.5)
        load(f"{url}/predict", bodies, 4, 16, 60)  # warm-up: first batches, allocator, connections
        for clients in args.clients:
            rate, latencies, done = load(f"{url}/predict", bodies, clients, args.requests, args.seconds)
            rows.append((clients, rate, percentile(latencies, 50), percentile(latencies, 99), done))
            print(f"{clients} clients: {done} images, {rate:.2f} images/s", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    after = offline(model, images, work / "offline-after.csv", args.accelerator, args.devices)
    reference = (before + after) / 2
    print(f"offline score: {before:.2f} images/s before the server, {after:.2f} after (mean {reference:.2f})")
    print("\n| clients | images | images/s | p50 latency (ms) | p99 latency (ms) | of offline `score` |")
    print("|---|---|---|---|---|---|")
    for clients, rate, p50, p99, done in rows:
        print(f"| {clients} | {done} | {rate:.2f} | {p50 * 1000:.0f} | {p99 * 1000:.0f} | {rate / reference:.0%} |")
    print(f"\nuptime at the end: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
