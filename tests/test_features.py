"""The frozen-feature cache: exact features, reuse, invalidation, crash safety, shared encoding, and the same metrics
as the pixel path."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from mst_clipiqa.data import features as features_module
from mst_clipiqa.data.datamodule import IQADataModule
from mst_clipiqa.data.features import FeatureRows, TableFeatures, collate_features
from mst_clipiqa.data.preprocess import ClipPreprocess, load_pixels
from mst_clipiqa.data.tables import load_source
from mst_clipiqa.demo.tiny_clip import build_tiny_clip
from mst_clipiqa.model import MSTCLIPIQA, ModelConfig
from mst_clipiqa.training.lit_module import MSTCLIPIQAModule


def make_net(clip: tuple[str, str], variant: str = "template", **config) -> MSTCLIPIQA:
    torch.manual_seed(0)
    return MSTCLIPIQA(ModelConfig(coarse_encoder=clip[0], fine_encoder=clip[1], variant=variant, **config)).eval()


def count_images(net: MSTCLIPIQA) -> dict[str, int]:
    """Images seen by each image tower (and prompts by the text tower), counted by forward hooks."""
    seen = {"coarse": 0, "fine": 0, "text": 0}

    def counter(name):
        def hook(module, args, kwargs, output):
            inputs = kwargs.get("pixel_values", kwargs.get("input_ids"))
            seen[name] += len(inputs)

        return hook

    net.encoder.coarse.register_forward_hook(counter("coarse"), with_kwargs=True)
    net.encoder.fine.register_forward_hook(counter("fine"), with_kwargs=True)
    if net.needs_prompt:
        net.prompt_encoder.text.register_forward_hook(counter("text"), with_kwargs=True)
    return seen


def table_features(table: datasets.Dataset, clip, cache: Path, **options) -> TableFeatures:
    return TableFeatures(table, ClipPreprocess.from_pretrained(clip[0]), cache_dir=cache, batch_size=16, **options)


@pytest.fixture(scope="module")
def table(demo_data) -> datasets.Dataset:
    return load_source("agiqa-3k", demo_data)


@pytest.fixture(scope="module")
def net(tiny_clip) -> MSTCLIPIQA:
    return make_net(tiny_clip)


def test_features_are_the_encoders_outputs_and_a_second_run_reads_them_all(table, net, tiny_clip, tmp_path, caplog):
    rows = list(range(len(table)))
    first = table_features(table, tiny_clip, tmp_path)
    first.prepare(rows, net)
    assert (first.stats.images_encoded, first.stats.images_cached) == (len(table), 0)

    preprocess = ClipPreprocess.from_pretrained(tiny_clip[0])
    pixels = torch.stack([load_pixels(image, preprocess) for image in table["image"]])  # (N, 3, 224, 224)
    coarse_embeds, fine_embeds = net.encoder(pixels)
    torch.testing.assert_close(first.coarse_embeds, coarse_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.fine_embeds, fine_embeds, atol=1e-5, rtol=1e-5)

    second_net = make_net(tiny_clip)  # a new process would load the same towers
    seen = count_images(second_net)
    second = table_features(table, tiny_clip, tmp_path)
    with caplog.at_level("INFO"):
        second.prepare(rows, second_net)
    assert seen == {"coarse": 0, "fine": 0, "text": 0}
    assert (second.stats.images_cached, second.stats.images_encoded) == (len(table), 0)
    assert torch.equal(second.coarse_embeds, first.coarse_embeds) and torch.equal(second.fine_embeds, first.fine_embeds)
    assert f"{len(table)} from the cache, 0 encoded" in caplog.text


def test_a_change_invalidates_exactly_what_changed(demo_data, tiny_clip, tmp_path):
    root = Path(shutil.copytree(demo_data, tmp_path / "data"))
    table = load_source("agiqa-3k", root)
    rows, n = list(range(len(table))), len(table)
    cache = tmp_path / "cache"
    table_features(table, tiny_clip, cache).prepare(rows, make_net(tiny_clip))

    def encoded(clip, table=table, **options) -> tuple[dict[str, int], TableFeatures]:
        net = make_net(clip)
        seen = count_images(net)
        features = table_features(table, clip, cache, **options)
        features.prepare(rows, net)
        return seen, features

    other_fine = str(build_tiny_clip(tmp_path / "other-b16", patch_size=16, seed=7))
    assert encoded((tiny_clip[0], other_fine))[0] == {"coarse": 0, "fine": n, "text": 0}
    assert encoded(tiny_clip, draft_decode=True)[0] == {"coarse": n, "fine": n, "text": 0}
    assert encoded(tiny_clip)[0] == {"coarse": 0, "fine": 0, "text": 0}

    changed = Path(table[3]["image"]["path"])
    with Image.open(changed) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, format=image.format)
    seen, features = encoded(tiny_clip, table=load_source("agiqa-3k", root))
    assert seen == {"coarse": 1, "fine": 1, "text": 0}
    assert (features.stats.images_encoded, features.stats.images_cached) == (1, n - 1)


def test_prompt_states_are_unpadded_in_the_cache_and_padded_and_masked_per_batch(table, tiny_clip, tmp_path):
    net = make_net(tiny_clip, variant="prompt")
    seen = count_images(net)
    features = table_features(table, tiny_clip, tmp_path)
    features.prepare(range(len(table)), net)
    distinct = len(set(table["prompt"]))
    assert seen["text"] == distinct and features.stats.prompts_encoded == distinct

    lengths = {row: len(features.prompt_states(row)) for row in range(len(table))}
    rows = sorted(lengths, key=lengths.get)[::10]  # prompts of several lengths
    assert len({lengths[row] for row in rows}) > 2
    batch = collate_features([FeatureRows(features, rows, "quality")[i] for i in range(len(rows))])

    prompts = [table[row]["prompt"] for row in rows]
    states, mask = net.prompt_encoder(prompts)  # the pixel path's padded states and mask
    assert torch.equal(batch["prompt_mask"], mask)
    torch.testing.assert_close(batch["prompt_states"][mask], states[mask], atol=1e-5, rtol=1e-5)
    assert not batch["prompt_states"][~mask].any()

    preprocess = ClipPreprocess.from_pretrained(tiny_clip[0])
    pixels = torch.stack([load_pixels(table[row]["image"], preprocess) for row in rows])
    cached = {key: batch[key] for key in ("coarse_embeds", "fine_embeds", "prompt_states")}
    from_cache = net(**cached, prompt_mask=mask).score
    with torch.no_grad():
        torch.testing.assert_close(from_cache, net(pixels, prompts).score, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["template", "prompt"])
def test_a_batch_read_at_once_is_the_collated_items(table, tiny_clip, tmp_path, variant):
    features = table_features(table, tiny_clip, tmp_path)
    features.prepare(range(len(table)), make_net(tiny_clip, variant=variant))
    rows = FeatureRows(features, [40, 3, 17, 8, 60], "quality")
    picked = [4, 0, 2, 1]
    whole = collate_features(rows.__getitems__(picked))
    items = collate_features([rows[i] for i in picked])
    assert whole.keys() == items.keys()
    for key, value in items.items():
        assert value.dtype == whole[key].dtype and torch.equal(value, whole[key]), key


def test_a_crash_mid_write_leaves_nothing_readable_and_the_rerun_matches_a_clean_run(
    table, net, tiny_clip, tmp_path, monkeypatch
):
    rows = list(range(len(table)))
    monkeypatch.setattr(features_module, "SHARD_SIZE", 16)
    save = datasets.Dataset.save_to_disk
    calls = []

    def crash_on_third(self, path, **kwargs):
        calls.append(path)
        save(self, path, **kwargs)  # the shard is on disk, but never renamed into place
        if len(calls) == 3:
            raise KeyboardInterrupt("killed while writing a shard")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        table_features(table, tiny_clip, tmp_path / "cache").prepare(rows, net)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save)
    assert list((tmp_path / "cache").glob("image-*/.tmp-*"))  # the half-done shard is still there

    rerun = table_features(table, tiny_clip, tmp_path / "cache")
    rerun.prepare(rows, net)
    assert rerun.stats.images_cached == 16 and rerun.stats.images_encoded == len(table) - 16
    clean = table_features(table, tiny_clip, tmp_path / "clean")
    clean.prepare(rows, net)
    torch.testing.assert_close(rerun.coarse_embeds, clean.coarse_embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rerun.fine_embeds, clean.fine_embeds, atol=1e-6, rtol=1e-6)


def test_ranks_share_the_encoding_and_all_read_the_union(table, tiny_clip, tmp_path):
    """Two ranks as two threads: each encodes half, writes its own shard, and reads everything after the barrier."""
    net = make_net(tiny_clip, variant="prompt")
    seen = count_images(net)
    sync, box = threading.Barrier(2, timeout=60), {}
    ranks = [table_features(table, tiny_clip, tmp_path) for _ in range(2)]
    errors = []

    def run(rank: int) -> None:
        def broadcast(obj):
            if rank == 0:
                box["plan"] = obj
            sync.wait()
            return box["plan"]

        try:
            ranks[rank].prepare(range(len(table)), net, rank=rank, world_size=2, broadcast=broadcast, barrier=sync.wait)
        except Exception as err:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(err)
            sync.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert seen == {"coarse": len(table), "fine": len(table), "text": len(set(table["prompt"]))}
    for namespace in tmp_path.glob("*-*"):
        assert len(list(namespace.glob("shard-*"))) == 2, namespace  # one per rank
    assert torch.equal(ranks[0].coarse_embeds, ranks[1].coarse_embeds)
    assert torch.equal(ranks[0].fine_embeds, ranks[1].fine_embeds)
    assert all(torch.equal(ranks[0].prompt_states(r), ranks[1].prompt_states(r)) for r in range(len(table)))


def _validate(module: MSTCLIPIQAModule, data: IQADataModule, root: Path) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return metrics


@pytest.mark.parametrize("variant", ["template", "prompt"])
def test_the_feature_path_gives_the_pixel_paths_validation_metrics(demo_data, tiny_clip, tmp_path, variant):
    def data(features: bool) -> IQADataModule:
        return IQADataModule(
            source="agiqa-3k",
            root=demo_data,
            eval_batch_size=16,
            num_workers=0,
            features=features,
            cache_dir=str(tmp_path / "cache"),
        )

    module = MSTCLIPIQAModule(net=ModelConfig(coarse_encoder=tiny_clip[0], fine_encoder=tiny_clip[1], variant=variant))
    module.net.set_mos_range(0.0, 5.0)
    with torch.no_grad():  # a head that is not constant, so the correlations mean something
        for parameter in module.net.fusion.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    pixels = _validate(module, data(False), tmp_path)
    cached = _validate(module, data(True), tmp_path)
    assert pixels.keys() == cached.keys() and "val/srcc" in cached
    for key, value in pixels.items():
        assert abs(cached[key] - value) <= 1e-5, (key, value, cached[key])
    assert len(set(np.round(list(cached.values()), 6))) > 1


def test_features_need_the_trainers_model_but_pixels_do_not(demo_data, tiny_clip):
    data = IQADataModule(source="agiqa-3k", root=demo_data, num_workers=0).follow(ModelConfig(tiny_clip[0]))
    data.setup("fit")
    with pytest.raises(RuntimeError, match="features=False"):
        data.val_dataloader()
    data.hparams.features = False
    batch = next(iter(data.val_dataloader()))
    assert batch["pixel_values"].shape[1:] == (3, 224, 224)
