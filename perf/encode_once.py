"""Fit time, speed-up of the feature cache, scoring speed against the machine's matmul bound, and peak memory.

Runs the real architectures (openai/clip-vit-base-patch32 and -patch16) with random weights, from an offline hub
cache: speed and memory are those of the real models, scores mean nothing. The cache is ``--hub DIR``, by default
WORKDIR/hub; where it does not exist, `standins.build_random_hub_cache` builds it there (about a minute
and 1 GB; with the default temporary work folder, at every run). The data is the demo generator's (5 images per
scene), split scene-disjoint as in experiments/demo.yaml.

    python perf/encode_once.py [--workdir DIR] [--hub DIR] [--scenes 20] [--epochs 10] [--device cpu|cuda]

Each measurement runs in its own process (so its peak RSS is its own) and prints one JSON line; this process
prints a markdown report with the machine. Measurements:

- fit: `trainer.fit` of experiments/demo.yaml for 1 and for `--epochs` epochs, each from an empty feature cache
  (`--repeats` times, interleaved, keeping the fastest); again for `--epochs` epochs with the cache already filled;
  and for `--epochs` epochs reading pixels and running both towers at every step (``data.features=false``).
- score: images/s of `Scorer.score` on the image files (decoding included), plain and with ``compile=True``; then of
  the network alone on preprocessed batches (``MSTCLIPIQA.forward``: both towers and the head, inference mode, bf16
  autocast on CUDA) in interleaved rounds: with transformers' stock QuickGELU, with ours (in place, the default),
  compiled, and on the CPU under bf16 autocast; and of the default at several batch sizes. All against the matmul
  bound: the fastest GEMM rate of this process (``torch.matmul`` of two large square matrices, fp32 on the CPU, bf16
  on CUDA) divided by the FLOPs of one image through both towers, computed from their configs by `tower_flops`.
  Every timing is the fastest of its repeats. Peak memory (RSS, or GPU memory allocated) is taken right after the
  plain `Scorer` run, before the comparison loads more copies of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
COARSE, FINE = "openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16"


# ---- FLOPs of one image -------------------------------------------------------------------------------------------


def tower_flops(config) -> float:
    """FLOPs (2 per multiply-add) of one 224x224 image through a CLIP ViT image tower, from its config.

    Counts the matrix products, which are all but a few percent of the work: the patch embedding, per layer the
    Q, K, V and output projections (4 T d^2), the two MLP layers (2 T d f) and attention's Q K^T and A V (2 T^2 d),
    then the projection to the embedding. T = (image / patch)^2 + 1 tokens (the class token), d the width, f the MLP
    width. Layer norms, softmax, GELU and biases are left out.
    """
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    macs = patches * 3 * config.patch_size**2 * d
    macs += layers * (4 * tokens * d * d + 2 * tokens * d * f + 2 * tokens * tokens * d)
    macs += d * config.projection_dim
    return 2.0 * macs


# ---- measurements, each in its own process ------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fit(args: argparse.Namespace) -> dict:
    import warnings

    from mst_clipiqa.cli.trainer import MSTCLIPIQACLI

    options = [
        "--config", str(CONFIG),
        "--data.root", str(args.workdir / "data"),
        "--data.features", str(args.features).lower(),
        "--data.cache_dir", str(args.cache),
        "--model.net.coarse_encoder", COARSE,
        "--model.net.fine_encoder", FINE,
        "--trainer.max_epochs", str(args.epochs),
        "--trainer.default_root_dir", str(args.workdir / "runs"),
        "--trainer.logger.init_args.save_dir", str(args.workdir / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", args.device,
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = MSTCLIPIQACLI(args=options, run=False)
    seconds, cpu_seconds = timed(lambda: cli.trainer.fit(cli.model, datamodule=cli.datamodule), repeats=1, warm_up=0)
    stats = cli.datamodule.features.stats.__dict__ if cli.datamodule.features is not None else {}
    split = cli.datamodule.split
    parts = [len(split.train), len(split.val), len(split.test)]
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "cache": stats,
        "train_val_test": parts,
    }


def timed(step, repeats: int, warm_up: int = 1, sync=lambda: None) -> tuple[float, float]:
    """The shortest wall-clock and CPU seconds (all threads of this process) of one call of `step`.

    The minimum over repeats is the run least disturbed by other work on the machine. CPU time also stops while other
    processes hold the cores, a second view of the same speed on a shared machine.
    """
    walls, cpus = [], []
    for _ in range(warm_up + repeats):
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls[warm_up:]), min(cpus[warm_up:])


def score(args: argparse.Namespace) -> dict:
    import torch
    from transformers.activations import QuickGELUActivation

    from mst_clipiqa.data.preprocess import ClipPreprocess, load_pixels
    from mst_clipiqa.model import InPlaceQuickGELU, ModelConfig
    from mst_clipiqa.scoring.scorer import Scorer
    from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    gemm_size, gemm_repeats = (8192, 20) if cuda else (4096, 3)
    sync = torch.cuda.synchronize if cuda else lambda: None

    def load() -> MSTCLIPIQAModule:
        module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=COARSE, fine_encoder=FINE))
        module.net.set_mos_range(0.0, 5.0)
        return module.to(device).eval()

    module = load()
    net = module.net
    flops = tower_flops(net.encoder.coarse.config) + tower_flops(net.encoder.fine.config)
    paths = sorted(str(p) for p in (args.workdir / "data" / "images").iterdir())
    batches = sorted({1, 8, 32, args.batch})

    def gemm() -> list[float]:
        """GEMM FLOP/s by wall-clock and per CPU-second."""
        return [2 * gemm_size**3 / seconds for seconds in timed(lambda: torch.matmul(a, b), gemm_repeats, sync=sync)]

    def rate(model, batch: int, repeats: int, bf16: bool = cuda) -> list[float]:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return [batch / s for s in timed(lambda: model(pixels[:batch]), repeats, sync=sync)]

    # The scoring process as a user runs it, alone first, so that its peak memory is its own.
    scorer = Scorer(module, device=device)
    scorer.score(paths[: args.batch], batch_size=args.batch)  # warm-up
    scorer_rate = [len(paths) / s for s in timed(lambda: scorer.score(paths, batch_size=args.batch), 1, warm_up=0)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mb()
    a = torch.randn(gemm_size, gemm_size, device=device, dtype=dtype)
    b = torch.randn(gemm_size, gemm_size, device=device, dtype=dtype)
    preprocess = ClipPreprocess.from_pretrained(COARSE)
    pixels = torch.stack([load_pixels(path, preprocess) for path in paths[: max(batches)]]).to(device)
    pixels = pixels.repeat(-(-max(batches) // len(pixels)), 1, 1, 1)[: max(batches)]  # fewer files than a batch

    # Then the towers three ways, at the scoring batch size, interleaved over rounds with the GEMM (the fastest of
    # each): the stock QuickGELU, the in-place one (the default), compiled (Scorer(compile=True)), and on the CPU the
    # default under bf16 autocast (Scorer(precision="bf16"); on a GPU bf16 is the default).
    stock = load()
    for parent in stock.net.modules():
        if isinstance(getattr(parent, "activation_fn", None), InPlaceQuickGELU):
            parent.activation_fn = QuickGELUActivation()
    compiled = Scorer(load(), device=device, compile=True)
    start = time.perf_counter()
    compiled.score(list(pixels[: args.batch]), batch_size=args.batch)  # compiles both towers for this batch size
    compile_seconds = time.perf_counter() - start
    compiled_rate = [len(paths) / s for s in timed(lambda: compiled.score(paths, batch_size=args.batch), 1, 0)]
    nets = {
        "stock QuickGELU": (stock.net, cuda),
        "in-place QuickGELU (default)": (net, cuda),
        "compiled": (compiled.module.net, cuda),
    }
    if not cuda:
        nets["bf16 autocast"] = (net, True)
    repeats = max(2, args.images // args.batch)
    best = {name: [0.0, 0.0] for name in nets}
    gemms = []
    for _ in range(args.rounds):
        gemms.append(gemm())
        for name, (model, bf16) in nets.items():
            best[name] = [max(old, new) for old, new in zip(best[name], rate(model, args.batch, repeats, bf16))]
    gemms.append(gemm())
    per_batch = {batch: rate(net, batch, max(2, args.images // batch)) for batch in batches}
    rates = [max(g[i] for g in gemms) for i in range(2)]  # (wall, CPU): the fastest GEMM of the run
    return {
        "gflop_per_image": flops / 1e9,
        "gemm_gflops": [[rate / 1e9 for rate in g] for g in gemms],
        "bound_images_per_s": [rate / flops for rate in rates],
        "net_images_per_s": per_batch,
        "towers_images_per_s": best,
        "scorer_images_per_s": scorer_rate,
        "compiled_scorer_images_per_s": compiled_rate,
        "compile_seconds": compile_seconds,
        "scorer_images": len(paths),
        "threads": torch.get_num_threads(),
        "peak_mb": peak,
        "device_name": torch.cuda.get_device_name(device) if cuda else "",
    }


# ---- the report -----------------------------------------------------------------------------------------------------


def machine() -> str:
    import torch

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def use_hub_cache(hub: Path | None, workdir: Path) -> Path:
    """Point this process at the offline hub cache the towers load from (HF_HUB_CACHE, HF_HUB_OFFLINE) and return it:
    `hub` as it is where that folder exists, else random-weight towers of the real shapes built there; None for
    WORKDIR/hub, whose towers are built or completed as needed.

    Call it before transformers or Lightning is imported: huggingface_hub reads both variables once, when imported.
    """
    folder = (workdir / "hub" if hub is None else hub).resolve()
    os.environ.update(HF_HUB_CACHE=str(folder), HF_HUB_OFFLINE="1")
    if hub is None or not folder.exists():
        from standins import build_random_hub_cache

        print(f"Building random-weight towers of the real shapes in {folder}", file=sys.stderr, flush=True)
        build_random_hub_cache(folder)  # keeps the towers already there
    return folder


def run_worker(kind: str, args: argparse.Namespace, **options) -> dict:
    command = [sys.executable, __file__, "--hub", str(args.hub), "--worker", kind, "--workdir", str(args.workdir)]
    command += ["--device", args.device, "--batch", str(args.batch), "--images", str(args.images)]
    command += ["--rounds", str(args.rounds)]
    for name, value in options.items():
        command += [f"--{name}", str(value)]
    env = {**os.environ, "HF_HUB_CACHE": str(args.hub), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(kind, options, json.dumps(result), file=sys.stderr, flush=True)
    return result


def score_lines(args: argparse.Namespace, result: dict) -> list[str]:
    bound_wall, bound_cpu = result["bound_images_per_s"]
    gemm = ", ".join(f"{wall:.0f}" for wall, _ in result["gemm_gflops"])
    memory = "peak GPU memory allocated" if result["device_name"] else "peak RSS"
    lines = [
        f"Scoring ({result['device_name'] or 'CPU'}, {result['threads']} torch threads): "
        f"{result['gflop_per_image']:.2f} GFLOP per image through both towers. GEMM over the run: {gemm} GFLOP/s. "
        f"Matmul bound (fastest GEMM): {bound_wall:.2f} images/s ({bound_cpu:.2f} per CPU-second).",
        "",
        "| path | batch | images/s | of the bound | images per CPU-second | of the bound per CPU-second |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(f"towers + head, {name}", args.batch, rates) for name, rates in result["towers_images_per_s"].items()]
    rows += [("towers + head, default", batch, rates) for batch, rates in result["net_images_per_s"].items()]
    files = f"{result['scorer_images']} files, decoding included"
    rows.append((f"Scorer.score, {files}", args.batch, result["scorer_images_per_s"]))
    rows.append((f"Scorer.score(compile=True), {files}", args.batch, result["compiled_scorer_images_per_s"]))
    for path, batch, (wall, cpu) in rows:
        lines.append(f"| {path} | {batch} | {wall:.2f} | {wall / bound_wall:.0%} | {cpu:.2f} | {cpu / bound_cpu:.0%} |")
    return [
        *lines,
        "",
        f"Compiling both towers (first compiled batch included): {result['compile_seconds']:.0f} s. "
        f"Scoring process, {memory}: {result['peak_mb']:.0f} MiB (before the comparison loaded more copies).",
        "",
    ]


def fastest(runs: list[dict]) -> dict:
    """Of repeated fits, the fastest: wall-clock and CPU seconds each at their minimum."""
    return {**runs[0], "seconds": min(r["seconds"] for r in runs), "cpu_seconds": min(r["cpu_seconds"] for r in runs)}


def fit_lines(args: argparse.Namespace) -> list[str]:
    n = args.epochs
    cold = {1: [], n: []}
    for repeat in range(args.repeats):  # interleaved, so slow spells of a shared machine hit both alike
        for epochs in cold:
            cache = args.workdir / f"cache-{epochs}-{repeat}"
            cold[epochs].append(run_worker("fit", args, epochs=epochs, features="true", cache=cache))
    runs = {
        "1 epoch, empty cache": fastest(cold[1]),
        f"{n} epochs, empty cache": fastest(cold[n]),
        f"{n} epochs, filled cache": run_worker("fit", args, epochs=n, features="true", cache=cache),
        f"{n} epochs, both towers at every step (features=false)": run_worker(
            "fit", args, epochs=n, features="false", cache=cache
        ),
    }
    one, many, _, pixels = runs.values()
    lines = [
        f"Fit: {args.scenes * 5} images, train/val/test {one['train_val_test']}; empty-cache fits: fastest of "
        f"{args.repeats}.",
        "",
        "| fit | seconds | CPU seconds | peak RSS (MiB) | images encoded / read from the cache |",
        "|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        counts = f"{run['cache']['images_encoded']} / {run['cache']['images_cached']}" if run["cache"] else "-"
        lines.append(
            f"| {name} | {run['seconds']:.1f} | {run['cpu_seconds']:.1f} | {run['peak_rss_mb']:.0f} | {counts} |"
        )

    def ratio(a: dict, b: dict) -> str:
        return f"{a['seconds'] / b['seconds']:.2f}x ({a['cpu_seconds'] / b['cpu_seconds']:.2f}x in CPU time)"

    return [
        *lines,
        "",
        f"- {n} epochs / 1 epoch, both from an empty cache: {ratio(many, one)}",
        f"- {n} epochs with both towers at every step / with the cache (empty at the start): {ratio(pixels, many)}",
        "",
    ]


def report(args: argparse.Namespace) -> str:
    from mst_clipiqa.demo.synthetic import make_demo_dataset

    make_demo_dataset(args.workdir / "data", n_scenes=args.scenes)
    lines = [f"Machine: {machine()}; device {args.device}.", ""]
    # Scoring first: it also brings the checkpoints into the page cache, which every fit below then finds there.
    if "score" in args.only:
        lines += score_lines(args, run_worker("score", args))
    if "fit" in args.only:
        lines += fit_lines(args)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="data, caches and runs (default: a temporary folder)")
    parser.add_argument(
        "--hub",
        type=Path,
        help="offline Hugging Face hub cache of the two towers (default: WORKDIR/hub); where it does not exist, "
        "random-weight towers of the real shapes are built there",
    )
    parser.add_argument("--scenes", type=int, default=20, help="demo scenes, 5 images each")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, help="scoring batch size (default: 8 on the CPU, 256 on CUDA)")
    parser.add_argument("--images", type=int, default=64, help="images timed per batch size (network alone)")
    parser.add_argument("--repeats", type=int, default=2, help="fits from an empty cache, per epoch count")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the three tower versions")
    parser.add_argument("--only", nargs="+", default=["fit", "score"], choices=("fit", "score"))
    parser.add_argument("--worker", choices=("fit", "score"), help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.device == "cpu" else 256)
    if args.worker:
        args.features = args.features == "true"
        print(json.dumps(fit(args) if args.worker == "fit" else score(args)))
        return
    with tempfile.TemporaryDirectory() as folder:
        args.workdir = (args.workdir or Path(folder)).resolve()
        args.hub = use_hub_cache(args.hub, args.workdir)
        print(report(args))


if __name__ == "__main__":
    main()
