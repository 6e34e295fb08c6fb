"""An encoder given as a folder of the Hugging Face cache is recognised as that hub model at that commit, through
huggingface_hub's own reading of its cache."""

from __future__ import annotations

from mst_clipiqa.hub.saved_model import _hub_origin

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_cache_snapshot_is_its_repo_at_its_commit_and_other_folders_are_not(tmp_path):
    repo = tmp_path / "models--some-org--clip-like"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    plain = tmp_path / "elsewhere" / "snapshots" / "encoder"
    plain.mkdir(parents=True)

    assert _hub_origin(str(snapshot)) == ("some-org/clip-like", COMMIT)
    assert _hub_origin(str(plain)) is None  # named like a snapshot folder, but in no cache
    assert _hub_origin(str(tmp_path)) is None
    assert _hub_origin(str(tmp_path / "missing")) is None
