"""A version's files are hashed once per node (``index.storage.digests``), and only while unchanged.

A replica that restarts on a node, or a second replica of the shard there, trusts the node's
earlier SHA-256 of an unchanged file instead of reading gigabytes again; a file written since is
hashed again, and a file modified within the last ``RACY_S`` is never remembered.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness.stores import write_store
from harness.synthetic import gaussian_mixture
from index.ann.shard_index import IndexLoadError, ShardIndex
from index.live.rebuild import build_shard
from index.storage import digests
from index.storage.manifest import load_manifest
from index.storage.publish import commit_results
from index.storage.versions import INDEX_FILE, VECTORS_FILE


def _settle(directory: Path, age_s: float = 10.0) -> None:
    """Date every file of ``directory`` ``age_s`` back: written long enough ago to remember."""
    then = time.time() - age_s
    for path in directory.iterdir():
        os.utime(path, (then, then))


@pytest.fixture
def version_dir(tmp_path, monkeypatch) -> tuple:
    monkeypatch.setenv("VISUAL_SEARCH_CACHE", str(tmp_path / "node"))
    vectors = gaussian_mixture(600, 16, clusters=8, seed=3)
    ids = [f"img-{i:04d}" for i in range(600)]
    store = write_store(tmp_path / "s", ids, [f"file:///{i}.jpg" for i in ids], vectors, 1)
    commit_results(store, [build_shard(store, 0)])
    return store, Path(store.index_version_dir(0, load_manifest(store).shards[0].dir))


def _memos() -> set[str]:
    root = digests.digests_root()
    return (
        {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.exists() else set()
    )


def test_a_file_just_written_is_hashed_every_time(version_dir):
    store, vdir = version_dir
    _settle(vdir, age_s=0)  # written just now (whatever the build took): racy, not remembered
    ShardIndex.load(store, 0)
    assert _memos() == set()


def test_an_unchanged_file_is_not_hashed_again_and_a_changed_one_is(version_dir):
    store, vdir = version_dir
    _settle(vdir)
    ShardIndex.load(store, 0)
    remembered = _memos()
    assert len(remembered) >= 3  # rows, vectors, index (and the optional files)

    # what the node remembers is what the next load uses: a wrong digest in its memory is
    # believed (the file is not read again) and the version refused
    memo = digests.digests_root() / digests._key(vdir / VECTORS_FILE, (vdir / VECTORS_FILE).stat())
    assert memo.name in remembered
    memo.write_text("0" * 64)
    with pytest.raises(IndexLoadError, match="checksum"):
        ShardIndex.load(store, 0)
    memo.unlink()
    assert ShardIndex.load(store, 0).count == 600

    # a file changed in place (same size, one flipped byte) has another key: hashed, refused
    data = bytearray((vdir / INDEX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (vdir / INDEX_FILE).write_bytes(bytes(data))
    _settle(vdir)
    with pytest.raises(IndexLoadError, match="checksum"):
        ShardIndex.load(store, 0)
    data[len(data) // 2] ^= 0xFF
    (vdir / INDEX_FILE).write_bytes(bytes(data))
    assert ShardIndex.load(store, 0).count == 600


def test_the_memory_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "MAX_ENTRIES", 10)
    root = tmp_path / "memo"
    for i in range(25):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes([i]) * 100)
        os.utime(path, (time.time() - 10, time.time() - 10))
        assert digests.sha256_of(path, root) == digests.sha256_of(path, root)
    assert 5 <= len([p for p in root.iterdir() if not p.name.startswith(".")]) <= 10
