"""The prompt head on a table whose prompt column is not mapped: one message naming the option, before any image is
decoded or encoded, in training as in scoring (tests/test_scorer.py)."""

import json

import pytest
from release_fixtures import make_table_release

from mst_clipiqa.cli.commands import main
from mst_clipiqa.demo.run import DEMO_CONFIG

ROWS = [(f"images/{i}.png", f"prompt {i}", float(i)) for i in range(6)]


def test_a_fit_of_the_prompt_head_without_the_prompt_column_names_the_option_before_encoding(
    tmp_path, tiny_clip, capsys
):
    table = make_table_release(tmp_path / "data", ROWS)
    run, cache = tmp_path / "run", tmp_path / "cache"
    options = json.dumps({"mos_columns": {"quality": "mos"}})  # the table has a prompt column; it is not mapped
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEMO_CONFIG), "--data.source", "table", "--data.root", str(table),
              "--data.source_options", options, "--data.protocol", "random", "--data.cache_dir", str(cache),
              "--model.net.variant", "prompt",
              "--model.net.coarse_encoder", tiny_clip[0], "--model.net.fine_encoder", tiny_clip[1],
              "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f"fit: error: {table}: none of its 6 images has a prompt" in error
    assert "--data.source_options.prompt_column COLUMN" in error and "on_bad" not in error
    assert not list(cache.glob("*/shard-*"))  # nothing was encoded
