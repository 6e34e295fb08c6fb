"""`mst-clipiqa score` end to end (files, loader worker processes, Lightning's predict loop, the file written) against
the towers alone on already-decoded tensors, in one run, on the CPU.

    python perf/score_engine.py WORKDIR --scenes 200 --towers tiny      # 1,000 demo images, tiny towers
    python perf/score_engine.py WORKDIR --scenes 8 --towers real        # 40 images, ViT-B/32 + B/16 shapes
    python perf/score_engine.py WORKDIR --scenes 200 --towers real --towers_images 200   # the towers alone on 200

`--towers real` builds random-weight towers of the real shapes as an offline hub cache in WORKDIR/hub (about 1 GB;
speed is the real models', scores mean nothing); `--towers tiny` builds `tiny_clip.build_tiny_pair`. Images come
from the demo generator (5 per scene, 256-320 px).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path


def random_model(work: Path, towers: str) -> Path:
    """A saved model of random weights on tiny towers or on towers of the real shapes (an offline hub cache in
    work/hub, which HF_HUB_CACHE must name), scoring on 0-5; built once in `work`."""
    from standins import build_random_hub_cache

    from mst_clipiqa.demo.tiny_clip import build_tiny_pair
    from mst_clipiqa.hub.pretrained import save_pretrained
    from mst_clipiqa.model import ModelConfig
    from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

    if towers == "real":
        build_random_hub_cache(work / "hub")
        net = ModelConfig()
    else:
        coarse, fine = build_tiny_pair(work / "tiny")
        net = ModelConfig(coarse_encoder=str(coarse), fine_encoder=str(fine))
    model = work / f"model-{towers}"
    if not model.exists():
        module = MSTCLIPIQAModule(net=net)
        module.net.set_mos_range(0.0, 5.0)
        save_pretrained(module, model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--scenes", type=int, default=200, help="demo scenes, 5 images each")
    parser.add_argument("--towers", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument(
        "--towers_images", type=int, help="images of the towers-alone pass, the first ones (default: all of them)"
    )
    args = parser.parse_args()
    work = args.workdir
    os.environ.setdefault("HF_HUB_CACHE", str(work / "hub"))
    os.environ["HF_HUB_OFFLINE"] = "1"

    import torch

    from mst_clipiqa.data.preprocess import ClipPreprocess, load_pixels
    from mst_clipiqa.demo.synthetic import make_demo_dataset
    from mst_clipiqa.hub.pretrained import from_pretrained
    from mst_clipiqa.scoring.scorer import score_files

    model = random_model(work, args.towers)
    images = sorted((make_demo_dataset(work / "demo", n_scenes=args.scenes) / "images").iterdir())
    print(f"{len(images)} images, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}")

    module = from_pretrained(model).eval()
    net = module.net_config
    alone = images[: args.towers_images] if args.towers_images else images
    pixels = torch.stack([load_pixels(p, ClipPreprocess.from_pretrained(net.coarse_encoder)) for p in alone])
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for i in range(0, len(pixels), 8):  # the command's CPU batch
            module.net.to_mos(module({"pixel_values": pixels[i : i + 8]}).score)
    towers = len(pixels) / (time.perf_counter() - start)
    print(f"towers alone on {len(pixels)} decoded tensors: {towers:.2f} images/s, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    del module, pixels

    start = time.perf_counter()
    report = score_files(model, [str(images[0].parent)], work / "scores.csv", accelerator="cpu",
                         precision=args.precision, num_workers=args.num_workers)  # fmt: skip
    wall = time.perf_counter() - start
    print(f"score, files to file: {report['images_per_s']:.2f} images/s in the predict loop "
          f"({len(images) / wall:.2f} counting the model's loading): {report['images_per_s'] / towers:.1%} "
          f"of the towers alone")  # fmt: skip
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
