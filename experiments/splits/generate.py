"""Write the split files of experiments/splits/ from the releases themselves: the splits every benchmark config in
experiments/ makes, by its protocol and arguments, from the image names (and prompts) the release lists.

    python experiments/splits/generate.py agiqa-1k=data/AGIQA-1K agiqa-3k=data/AGIQA-3K \
        aigciqa2023=data/AIGCIQA2023 evalmi-50k=data/EvalMi-50K

The rows are those a run keeps: the release as its reader reads it, less the rows `check_dataset` drops under the
config's `on_bad` (AGIQA-1K's name listed twice), images not decoded. Configs of one release and protocol share a
file; the target is recorded as quality, and every row of these releases carries each of their targets.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import yaml

from mst_clipiqa.data.checks import check_dataset
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.data.splits import make_splits, save_shipped_splits
from mst_clipiqa.data.tables import load_source

HERE = Path(__file__).parent
SHIPPED = ("agiqa-1k", "agiqa-3k", "aigciqa2023", "evalmi-50k")
EXTRA = ({"source": "evalmi-50k", "protocol": "prompt"},)
"""Splits shipped beside the configs' own: EvalMi-50K's prompt-disjoint ones (--data.protocol prompt)."""


def split_options(data: dict) -> dict:
    """The make_splits arguments of a config's data section, the data module's defaults where it names none."""
    defaults = {k: p.default for k, p in inspect.signature(IQADataModule.__init__).parameters.items()}
    get = {
        key: data.get(key, defaults[key])
        for key in ("protocol", "n_splits", "folds", "train_fraction", "val_fraction", "seed", "on_bad")
    }
    return get


def wanted() -> dict[Path, dict]:
    """Shipped file → the options of the configs that use it."""
    files = {}
    configs = [
        yaml.safe_load(path.read_text())["data"]
        for path in sorted(HERE.parent.glob("*.yaml"))
        if "data" in (yaml.safe_load(path.read_text()) or {})
    ]
    for data in [*configs, *EXTRA]:
        if data.get("source") in SHIPPED and data.get("protocol") != "official":
            options = {"source": data["source"], **split_options(data)}
            path = HERE / shipped_name(data["source"], options["protocol"])
            # Configs sharing a file may ask for fewer random splits: split i is the same in both.
            if path in files and files[path] != options:
                if {**files[path], "n_splits": 0} != {**options, "n_splits": 0}:
                    raise ValueError(
                        f"{path.name}: configs of one release and protocol differ in {files[path]} and {options}"
                    )
                options["n_splits"] = max(options["n_splits"], files[path]["n_splits"])
            files[path] = options
    return files


def shipped_name(source: str, protocol: str) -> str:
    return f"{source}_{protocol}.json.xz"


def main(roots: dict[str, str]) -> None:
    for path, options in wanted().items():
        if options["source"] not in roots:
            print(f"skipped {path.name}: no root given for {options['source']}")
            continue
        ds = check_dataset(
            load_source(options["source"], roots[options["source"]]),
            target="quality",
            need_prompt=True,
            check_images=False,
            on_bad=options["on_bad"],
        )
        splits = make_splits(
            ds,
            options["protocol"],
            target="quality",
            n_splits=options["n_splits"],
            k=options["folds"],
            train_fraction=options["train_fraction"],
            val_fraction=options["val_fraction"],
            seed=options["seed"],
        )
        save_shipped_splits(splits, path, ds)
        print(f"{path.name}: {len(ds)} names, {len(splits)} splits, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(dict(argument.split("=", 1) for argument in sys.argv[1:]))
