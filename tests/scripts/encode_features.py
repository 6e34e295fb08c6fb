"""Fill a feature cache with a demo table's image features, as a fit does, in a process of its own, and save what it
read and how many images its towers encoded: one of the processes that share a cache in tests/test_integrity.py.

    python encode_features.py RESULT.pt DEMO_DATA COARSE FINE CACHE [--shard-size N] [--ready FILE --start FILE]
        [--slow SECONDS]

--ready/--start: write FILE --ready once loaded, then wait for --start to exist, so that two processes start
encoding at the same moment. --slow: sleep that long in each coarse tower call, so that a test can kill the process
while it holds a claim.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mst_clipiqa.data import features
from mst_clipiqa.data.preprocess import ClipPreprocess
from mst_clipiqa.data.tables import load_source
from mst_clipiqa.model import MSTCLIPIQA, ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("result", "demo_data", "coarse", "fine", "cache"):
        parser.add_argument(name)
    parser.add_argument("--shard-size", type=int, default=features.SHARD_SIZE)
    parser.add_argument("--ready")
    parser.add_argument("--start")
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()

    features.SHARD_SIZE = args.shard_size
    table = load_source("agiqa-3k", args.demo_data)
    torch.manual_seed(0)
    net = MSTCLIPIQA(ModelConfig(coarse_encoder=args.coarse, fine_encoder=args.fine)).eval()
    seen = [0]

    def count(module, inputs, kwargs, output):
        seen[0] += len(kwargs["pixel_values"])
        time.sleep(args.slow)

    net.encoder.coarse.register_forward_hook(count, with_kwargs=True)
    cached = features.TableFeatures(
        table, ClipPreprocess.from_pretrained(args.coarse), cache_dir=args.cache, batch_size=8
    )
    if args.ready:
        Path(args.ready).touch()
        while not Path(args.start).exists():
            time.sleep(0.01)
    cached.prepare(range(len(table)), net)
    torch.save({"coarse": cached.coarse_embeds, "fine": cached.fine_embeds, "encoded": seen[0]}, args.result)


if __name__ == "__main__":
    main()
