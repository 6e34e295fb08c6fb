"""`mst-clipiqa benchmark --together`: the splits of a protocol trained in one loop give, bit for bit, what each
split's own fit gives."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mst_clipiqa.cli.commands import main
from mst_clipiqa.hub.saved_model import SavedModel
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule

CONFIG = Path(__file__).parents[1] / "experiments" / "demo.yaml"


def benchmark(demo_data, tiny_clip, tmp_path: Path, name: str, *options: str) -> list[dict[str, str]]:
    main(
        [
            "benchmark",
            "--config", str(CONFIG),
            "--variants", "template", "prompt",
            "--name", name,
            "--output", str(tmp_path / name),
            "--data.root", demo_data,
            "--data.cache_dir", str(tmp_path / "cache"),
            # 3 folds of the 80 images: 48, 48 and 49 training rows, so the third split takes one more batch of 16
            # per epoch and the others sit that step out.
            "--data.protocol", "kfold",
            "--data.folds", "3",
            "--model.net.coarse_encoder", tiny_clip[0],
            "--model.net.fine_encoder", tiny_clip[1],
            "--trainer.default_root_dir", str(tmp_path / name),
            "--trainer.max_epochs", "4",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false",
            *options,
        ]
    )  # fmt: skip
    with (tmp_path / name / "results.csv").open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def weights(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {key: value for key, value in state.items() if key.startswith(("net.fusion.", "net.head.", "net.mos"))}


def test_splits_trained_together_equal_each_split_trained_alone(demo_data, tiny_clip, tmp_path):
    alone = benchmark(demo_data, tiny_clip, tmp_path, "alone")
    together = benchmark(demo_data, tiny_clip, tmp_path, "together", "--together", "true")

    splits_file = next((tmp_path / "together").rglob("splits.json"))
    train_sizes = [len(split["train"]) for split in json.loads(splits_file.read_text())["splits"]]
    assert [-(-n // 16) for n in train_sizes] == [3, 3, 4]  # unequal epochs: the third split's last step is its own

    assert [(row["variant"], row["split"]) for row in together] == [(row["variant"], row["split"]) for row in alone]
    metrics = ("srcc", "plcc", "krcc", "rmse", "plcc_logistic")
    for solo, joint in zip(alone, together):
        assert {m: solo[m] for m in metrics} == {m: joint[m] for m in metrics}  # the same digits
        # The same best epoch and the same weights, bit for bit (and the same MOS range, the split's own).
        assert Path(solo["checkpoint"]).name == Path(joint["checkpoint"]).name.split("-", 1)[1]
        solo_weights, joint_weights = weights(solo["checkpoint"]), weights(joint["checkpoint"])
        assert solo_weights.keys() == joint_weights.keys() and len(solo_weights) > 4
        assert all(torch.equal(solo_weights[key], joint_weights[key]) for key in solo_weights)
    # One encoder pass and one start-up per head: the cache's counts are on the first split's row.
    assert [row["images_encoded"] for row in together] == ["0", "", "", "0", "", ""]

    # A member's checkpoint is a checkpoint like any other: loaded, scored, exported.
    checkpoint = together[4]["checkpoint"]
    module = MSTCLIPIQAModule.load_from_checkpoint(checkpoint)
    assert module.net_config.variant == "prompt" and module.net.has_mos_range
    saved = SavedModel.read(checkpoint)
    assert saved.training["data"]["split_index"] == 1
    assert saved.training["validation"]["monitor"] == "val/srcc"


def test_a_member_fine_tuned_from_a_saved_model_says_so_as_a_split_fitted_alone(
    demo_data, tiny_clip, saved_models, tmp_path
):
    base = ("--variants", "template", "--data.folds", "2", "--model.init_from", str(saved_models["template"][1]))
    alone = benchmark(demo_data, tiny_clip, tmp_path, "alone", *base, "--trainer.max_epochs", "1")
    together = benchmark(
        demo_data, tiny_clip, tmp_path, "together", *base, "--trainer.max_epochs", "1", "--together", "true"
    )
    for solo, joint in zip(alone, together, strict=True):
        fine_tuned_from = SavedModel.read(solo["checkpoint"]).training["fine_tuned_from"]
        assert (
            SavedModel.read(joint["checkpoint"]).training["fine_tuned_from"] == fine_tuned_from == {"name": "template"}
        )


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--trainer.accumulate_grad_batches", "2", "trainer.accumulate_grad_batches"), ("--splits", "4", "--splits 4")],
)
def test_what_together_cannot_keep_identical_is_refused_by_name(
    demo_data, tiny_clip, tmp_path, capsys, option, value, named
):
    with pytest.raises(SystemExit) as exit_info:
        benchmark(demo_data, tiny_clip, tmp_path, "refused", "--together", "true", option, value)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert named in message and "Traceback" not in message
