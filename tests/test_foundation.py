"""The shared contracts: shard hashing, Parquet schema, store writes, manifest commits."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from index.rows import schema
from index.rows.sharding import shard_of, shards_of, uri_id
from index.storage.manifest import Manifest, ManifestMismatch, commit_manifest, load_manifest
from index.storage.store import Store


def test_shard_of_is_stable_and_balanced():
    # Pinned values: changing the hash would silently re-route every stored row.
    assert uri_id("file:///a.jpg") == uri_id("file:///a.jpg") != uri_id("file:///b.jpg")
    assert [shard_of(str(i), 7) for i in range(5)] == [shard_of(str(i), 7) for i in range(5)]
    counts = np.bincount(shards_of((uri_id(f"img-{i}") for i in range(20_000)), 8), minlength=8)
    assert counts.min() > 2_300 and counts.max() < 2_700
    with pytest.raises(ValueError):
        shard_of("x", 0)


def test_embeddings_table_round_trips_as_fixed_size_list(tmp_path):
    vecs = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    table = schema.embeddings_table([f"id{i}" for i in range(5)], [f"u{i}" for i in range(5)], vecs)
    store = Store(tmp_path)
    store.write_parquet(table, store.path("x", "part-a.parquet"))
    back = pq.read_table(tmp_path / "x" / "part-a.parquet")
    assert str(back.schema.field("embedding").type) == "fixed_size_list<element: float>[8]"
    np.testing.assert_array_equal(schema.arrow_to_vectors(back["embedding"]), vecs)


def test_store_lists_only_committed_parts(tmp_path):
    store = Store(f"file://{tmp_path}")
    assert store.is_local and store.list_parts(0) == []
    d = store.embeddings_dir(3)
    store.write_bytes(f"{d}/part-b.parquet", b"x")
    store.write_bytes(f"{d}/part-a.parquet", b"x")
    store.write_bytes(f"{d}/base-v000001-0123abcd-00000.parquet", b"x")
    (tmp_path / "embeddings" / "shard=00003" / ".tmp-123").write_bytes(b"half")
    assert store.list_parts(3) == [  # delta candidates: never a version's base parts
        "embeddings/shard=00003/part-a.parquet",
        "embeddings/shard=00003/part-b.parquet",
    ]
    assert store.list_base_parts(3) == [
        "embeddings/shard=00003/base-v000001-0123abcd-00000.parquet"
    ]
    store.create_bytes(f"{d}/once", b"1")
    with pytest.raises(FileExistsError):
        store.create_bytes(f"{d}/once", b"2")
    assert (tmp_path / "embeddings" / "shard=00003" / "once").read_bytes() == b"1"


def _new(m):
    return m or Manifest(model="m", weights="w", dim=4, num_shards=2)


def test_manifest_commits_are_sequential_and_skip_torn_files(tmp_path):
    store = Store(tmp_path)
    assert load_manifest(store) is None
    first = commit_manifest(store, _new)
    assert first.sequence == 1 and set(first.shards) == {0, 1}

    def bump(m):
        m.shards[0].count += 1
        return m

    threads = [threading.Thread(target=commit_manifest, args=(store, bump)) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    latest = load_manifest(store)
    assert latest.sequence == 9 and latest.shards[0].count == 8  # no lost update
    # a torn newer file is ignored, the last complete one wins ...
    (tmp_path / "_manifests" / "000010.json").write_text('{"model": "m", "trunc')
    assert load_manifest(store).sequence == 9
    assert json.loads((tmp_path / "manifest.json").read_text())["sequence"] == 9
    # ... and does not block the next commit, which takes the number after it
    assert commit_manifest(store, bump).sequence == 11
    assert load_manifest(store).shards[0].count == 9
    with pytest.raises(ManifestMismatch):
        latest.check_compatible("other", "w", 4, 2)
    with pytest.raises(ManifestMismatch):
        latest.check_compatible("m", "w", 4, 3)
    latest.check_compatible("m", "w", 4, 2)
