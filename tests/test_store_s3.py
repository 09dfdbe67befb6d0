"""The store on a real S3 API (moto's server on 127.0.0.1): fresh listings across processes,
atomic manifest commits, unique version directories, the node cache of remote versions, and
compaction with garbage collection, through the same code that runs in production."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from harness.stores import write_store
from index.ann.shard_index import ShardIndex
from index.live.delta import load_live_shard
from index.live.parts import write_rows, write_tombstones
from index.live.rebuild import RebuildOptions, build_shard, rebuild_shard
from index.rows import schema
from index.storage.cache import node_cache
from index.storage.coverage import plan_shard
from index.storage.gc import collect_garbage
from index.storage.manifest import commit_manifest, load_manifest
from index.storage.publish import commit_results, list_versions
from index.storage.store import Store
from index.storage.versions import LOAD_CHECKS

ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def unit(rng, n):
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def small_store(s3_server, uri: str, n: int = 300, seed: int = 0) -> tuple[Store, np.ndarray]:
    x = unit(np.random.default_rng(seed), n)
    ids = [f"r{seed}-{i:04d}" for i in range(n)]
    store = Store(uri, s3_server.storage_options)
    write_store(store, ids, [f"s3://photos/{i}.jpg" for i in ids], x, 1)
    return store, x


def test_another_process_writes_are_seen_at_once(s3_server, s3_store_uri):
    """A reader that listed everything once sees another process's part, tombstone and manifest
    commit on its next look: listings and existence checks are never served from a cache."""
    store, x = small_store(s3_server, s3_store_uri)
    rebuild_shard(store, 0)
    before = load_manifest(store)
    view = load_live_shard(store, 0, before.shards[0].dir, DIM, "ip")
    assert view.refresh() == 0 and plan_shard(store, 0).up_to_date  # listed: cached, before
    next_manifest = f"{store.manifests_dir}/{before.sequence + 1:06d}.json"
    assert not store.exists(next_manifest)

    script = textwrap.dedent(
        f"""
        import numpy as np, pyarrow as pa
        from index.rows import schema
        from index.live.parts import write_rows, write_tombstones
        from index.storage.manifest import commit_manifest
        from index.storage.store import Store
        store = Store({s3_store_uri!r})  # options from $VISUAL_SEARCH_STORAGE_OPTIONS
        v = np.zeros((1, {DIM}), np.float32); v[0, 0] = 1
        write_rows(store, 0, schema.embeddings_table(["other-process"], ["s3://x"], v))
        write_tombstones(store, 0, ["r0-0005"])
        commit_manifest(store, lambda m: m)
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=s3_server.env(), check=True)

    assert store.exists(next_manifest)
    assert load_manifest(store).sequence == before.sequence + 1
    plan = plan_shard(store, 0)
    assert len(plan.new_parts) == 1 and len(plan.new_tombstones) == 1
    assert view.refresh() == 2
    q = np.zeros(DIM, np.float32)
    q[0] = 1
    assert view.search(q, 1)[0][0].id == "other-process"
    assert view.vector_of("r0-0005") is None and view.vector_of("r0-0006") is not None


def test_manifest_commits_are_atomic_creates_and_concurrent_shards_all_land(
    s3_server, s3_store_uri
):
    store, _ = small_store(s3_server, s3_store_uri)
    start = load_manifest(store).sequence
    manifest_path = f"{store.manifests_dir}/{start:06d}.json"
    with pytest.raises(FileExistsError):  # a conditional PUT: S3 answers 412
        store.create_bytes(manifest_path, b"{}")
    assert load_manifest(store).sequence == start  # the existing file is untouched

    shards, rounds = 6, 3

    def bump(shard: int) -> None:
        own = Store(s3_store_uri, s3_server.storage_options)
        for _ in range(rounds):

            def update(m, shard=shard):
                m.shards[0].count += 1
                m.shards[0].built_at = float(shard)
                return m

            commit_manifest(own, update)

    threads = [threading.Thread(target=bump, args=(s,)) for s in range(shards)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    final = load_manifest(store)
    assert final.sequence == start + shards * rounds  # every commit landed, none overwritten
    assert final.shards[0].count == load_manifest(store).shards[0].count == shards * rounds
    names = store.ls(store.manifests_dir)
    assert len(names) == len(set(names)) == min(start + shards * rounds, 50)


def test_two_builders_of_one_shard_never_share_a_directory(s3_server, s3_store_uri):
    store, _ = small_store(s3_server, s3_store_uri, n=1500)
    results = [None, None]

    def build(i: int) -> None:
        results[i] = build_shard(store, 0, RebuildOptions(force=True, seed=i))

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    a, b = results
    assert a.dir != b.dir and a.version == b.version == 1  # same number, separate directories
    for r in results:  # each directory holds exactly its own build's files
        assert LOAD_CHECKS.loads(store, 0, r.dir)
        loaded = ShardIndex.load(store, 0, r.dir)
        assert loaded.meta["dir"] == r.dir and loaded.meta["seed"] == r.meta["seed"]
    commit_results(store, [a])
    commit_results(store, [b])  # same number: the first commit stays live
    assert load_manifest(store).shards[0].dir == a.dir
    assert collect_garbage(store, 0, grace_s=0)["versions"] == [b.dir]  # the twin goes
    assert list_versions(store, 0) == [a.dir]


def test_node_cache_is_keyed_by_full_uri_bounded_and_evicted(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("VISUAL_SEARCH_CACHE", str(tmp_path / "cache"))
    bucket = s3_server.new_bucket()
    # two roots the old cache key (path with "/" -> "_") mapped to the same folder
    one, x_one = small_store(s3_server, f"{bucket}/team_a/x", n=200, seed=1)
    two, _ = small_store(s3_server, f"{bucket}/team/a/x", n=350, seed=2)
    for store in (one, two):
        rebuild_shard(store, 0)
    assert ShardIndex.load(one, 0).count == 200 and ShardIndex.load(two, 0).count == 350
    cache = tmp_path / "cache" / "visual-search-cache"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2

    # a bad copy in the cache is fetched again, not trusted forever
    live = load_manifest(one).shards[0].dir
    copy = next(p for p in cache.iterdir() if p.name.endswith(live))
    data = bytearray((copy / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "index.faiss").write_bytes(bytes(data))
    assert ShardIndex.load(one, 0).count == 200

    # garbage collection evicts the copy of a version it deletes
    rebuild_shard(one, 0, RebuildOptions(force=True))
    served = ShardIndex.load(one, 0)
    assert copy.exists()
    collect_garbage(one, 0, grace_s=0)
    assert not copy.exists()

    # bounded: with room for about one version, the least recently used copies are dropped,
    # served or not (the cache does not know what replicas serve: see index.storage.cache)
    largest = max(size for _, size, _ in node_cache().entries())
    monkeypatch.setenv("VISUAL_SEARCH_CACHE_BYTES", str(int(largest * 1.5)))
    rebuild_shard(two, 0, RebuildOptions(force=True))
    ShardIndex.load(two, 0)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    # ... and a version loaded from a removed copy keeps serving from its memory-mapped vectors
    assert not served.directory.exists()
    q = x_one[7]
    assert served.search_exact(q, 1)[0][0].id == "r1-0007"
    assert np.allclose(served.vector_of("r1-0007"), q, atol=1e-3)


def test_compaction_leaves_a_few_base_parts_after_many_small_writes(s3_server, s3_store_uri):
    store, x = small_store(s3_server, s3_store_uri, n=400)
    rebuild_shard(store, 0)
    rng = np.random.default_rng(5)
    added = unit(rng, 30)
    for i in range(30):  # API-sized writes: one row per part
        table = schema.embeddings_table([f"api-{i}"], [f"s3://u/{i}"], added[i : i + 1])
        write_rows(store, 0, table)
    for i in range(5):
        write_tombstones(store, 0, [f"r0-{i:04d}"])
    assert len(store.list_parts(0)) == 31 and len(store.list_tombstone_parts(0)) == 5
    summary = rebuild_shard(store, 0)
    assert summary["built"] and summary["count"] == 400 + 30 - 5
    meta = ShardIndex.load(store, 0).meta
    assert len(meta["parts"]) == 31 and len(meta["tombstone_parts"]) == 5
    collect_garbage(store, 0, grace_s=0)
    assert store.list_parts(0) == [] and store.list_tombstone_parts(0) == []
    assert store.list_base_parts(0) == meta["base_parts"] and len(meta["base_parts"]) == 1
    assert len(load_manifest(store).to_json()) < 600  # O(shards): no part lists in it
    view = load_live_shard(store, 0, meta["dir"], DIM, "ip")
    assert view.search(added[7], 1)[0][0].id == "api-7"
    assert view.vector_of("r0-0003") is None and view.count == 425
    # a deleted id added again after the compaction is visible again
    ts = pa.scalar(int(view.base.ingested_at(view.base.row_key("r0-0010"))) + 10**6)
    table = schema.embeddings_table(["r0-0003"], ["s3://again"], x[3:4], ingested_at=ts)
    write_rows(store, 0, table)
    assert view.refresh() == 1 and view.search(x[3], 1)[0][0].uri == "s3://again"
