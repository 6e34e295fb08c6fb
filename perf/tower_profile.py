"""Where the time of one frozen CLIP image tower goes on this machine: speed against the GEMM rate per batch size,
page faults per image, and the operators that take the time.

    python perf/tower_profile.py [--workdir DIR] [--hub DIR] [--tower openai/clip-vit-base-patch16]
        [--batches 1 8 16 32] [--tuned-malloc] [--compile]

`--tuned-malloc` fixes glibc's mmap threshold at its largest (32 MB) and its trim threshold at 1 GB before anything
is allocated, so freed buffers under 32 MB are reused instead of returned to the system and faulted in again.
`--compile` also times ``torch.compile`` of the tower (compile time excluded). Last, the tower's linear layers
alone (their matrix products at the tower's shapes, one after another, into preallocated outputs) against the same
GEMM rate: the ceiling of any version that keeps these products. Runs on the CPU with fp32, on random weights of the
real shapes from the offline hub cache ``--hub DIR``, by default WORKDIR/hub, built where it does not exist (as in
encode_once.py).
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import tempfile
import time
from pathlib import Path

from encode_once import timed, tower_flops, use_hub_cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the default hub cache goes (default: a temporary folder)")
    parser.add_argument(
        "--hub",
        type=Path,
        help="offline Hugging Face hub cache of the tower (default: WORKDIR/hub); where it does not exist, "
        "random-weight towers of the real shapes are built there",
    )
    parser.add_argument("--tower", default="openai/clip-vit-base-patch16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tuned-malloc", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if args.tuned_malloc:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    with tempfile.TemporaryDirectory() as folder:
        use_hub_cache(args.hub, (args.workdir or Path(folder)).resolve())
        profile_tower(args)


def profile_tower(args: argparse.Namespace) -> None:
    """Print the tables of the module's docstring for `args.tower`, from the hub cache of `use_hub_cache`."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import CLIPVisionModelWithProjection

    from mst_clipiqa.model import ModelConfig, load_tower

    tower = load_tower(CLIPVisionModelWithProjection, args.tower, ModelConfig())  # as the package runs it
    flops = tower_flops(tower.config)
    pixels = torch.randn(max(args.batches), 3, 224, 224)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)

    def gemm() -> float:
        return 2 * 4096**3 / timed(lambda: torch.matmul(a, b), args.repeats)[0]

    towers = {"eager": tower}
    if args.compile:
        start = time.perf_counter()
        towers["compiled"] = torch.compile(tower)
        with torch.inference_mode():
            towers["compiled"](pixel_values=pixels[: args.batches[0]])
        print(f"torch.compile: {time.perf_counter() - start:.0f} s for the first batch")
    print(f"{args.tower}: {flops / 1e9:.2f} GFLOP per image; torch threads {torch.get_num_threads()}")
    print("| tower | batch | GFLOP/s | GEMM GFLOP/s | of the GEMM rate | page faults per image |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, model in towers.items():
            for batch in args.batches:
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                seconds = timed(lambda: model(pixel_values=pixels[:batch]), args.repeats)[0]
                faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / ((args.repeats + 1) * batch)
                rate, bound = batch * flops / 1e9 / seconds, gemm() / 1e9
                print(f"| {name} | {batch} | {rate:.0f} | {bound:.0f} | {rate / bound:.0%} | {faults:.0f} |")
        batch = 8 if 8 in args.batches else args.batches[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            tower(pixel_values=pixels[:batch])
    sys.stdout.flush()
    print(f"\nOperators of one eager call at batch {batch}, by own CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    print("| batch | linear layers alone, GFLOP/s | GEMM GFLOP/s | of the GEMM rate |\n|---|---|---|---|")
    for batch in args.batches:
        rate, bound = linear_layers_rate(tower.config, batch, args.repeats), gemm() / 1e9
        print(f"| {batch} | {rate:.0f} | {bound:.0f} | {rate / bound:.0%} |")


def linear_layers_rate(config, batch: int, repeats: int) -> float:
    """GFLOP/s of a tower's linear layers alone at `batch` images: per layer the Q, K, V and output projections and the
    two MLP layers, as (tokens x in) @ (in x out) products into preallocated outputs, one after another, each layer
    with its own weights."""
    import torch

    d, f = config.hidden_size, config.intermediate_size
    rows = batch * ((config.image_size // config.patch_size) ** 2 + 1)
    shapes = [(d, d)] * 4 + [(d, f), (f, d)]
    inputs = {k: torch.randn(rows, k) for k in (d, f)}
    outputs = {n: torch.empty(rows, n) for n in (d, f)}
    weights = [[torch.randn(k, n) for k, n in shapes] for _ in range(config.num_hidden_layers)]  # each layer its own
    flops = config.num_hidden_layers * sum(2 * rows * k * n for k, n in shapes)

    def run() -> None:
        for layer in weights:
            for w in layer:
                torch.matmul(inputs[w.shape[0]], w, out=outputs[w.shape[1]])

    return flops / 1e9 / timed(run, repeats)[0]


if __name__ == "__main__":
    main()
