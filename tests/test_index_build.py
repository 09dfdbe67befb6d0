"""Shard index versions on a real store: build, no-op re-run, crash safety, corruption, search.

Small synthetic shards (a Gaussian mixture, 32-d) keep these fast; recall on real embeddings is
in test_index_ann.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from harness.stores import write_store
from harness.synthetic import gaussian_mixture
from index.ann.build import build_arrays
from index.ann.shard_index import IndexLoadError, ShardIndex, default_candidates
from index.ann.tune import SATURATED, saturated_nprobe
from index.live.rebuild import RebuildOptions, build_shard
from index.storage.manifest import load_manifest
from index.storage.publish import commit_results, list_versions
from index.storage.store import Store
from index.storage.versions import INDEX_FILE, META_FILE, VECTORS_FILE, version_number

ROOT = Path(__file__).resolve().parents[1]
DIM = 32


def _rows(n: int, seed: int = 0, prefix: str = "img"):
    vectors = gaussian_mixture(n, DIM, clusters=20, seed=seed)
    ids = [f"{prefix}-{seed}-{i:05d}" for i in range(n)]
    uris = [f"file:///photos/{i}.jpg" for i in ids]
    return ids, uris, vectors


def _build_all(store: Store, **kwargs) -> list:
    manifest = load_manifest(store)
    options = RebuildOptions(**kwargs)
    results = [build_shard(store, s, options) for s in range(manifest.num_shards)]
    done = [r for r in results if r is not None]
    if done:
        commit_results(store, done)
    return results


def _version_dirs(store: Store, shard: int) -> list[str]:
    return store.ls(store.shard_index_dir(shard))


def _numbers(store: Store, shard: int) -> list[int]:
    return [version_number(n) for n in list_versions(store, shard)]


def test_build_search_and_noop_rerun(tmp_path):
    ids, uris, vectors = _rows(2400)
    store = write_store(tmp_path / "s", ids, uris, vectors, num_shards=2)
    first = _build_all(store)
    assert all(r is not None and r.version == 1 for r in first)
    manifest = load_manifest(store)
    assert sum(manifest.shards[s].count for s in (0, 1)) == 2400
    assert manifest.shards[0].dir == first[0].dir and "parts" not in manifest.to_json()

    shard = ShardIndex.load(store, 0)
    assert shard.meta["kind"] == "ivfpq" and "x4fs" in shard.meta["factory"]
    assert shard.meta["parts"] == store.list_parts(0) and shard.meta["train_size"] >= 30 * 16
    assert shard.meta["base_parts"] == store.list_base_parts(0)  # the compacted rows
    assert set(shard.meta["files"]) == {"index.faiss", "rows.parquet", "vectors.npy"}
    # a stored vector finds itself first, with its exact (float16) score
    row_id = shard.id_of(5)
    vec = shard.vector_of(row_id)
    assert vec is not None and vec.dtype == np.float32 and shard.vector_of("nope") is None
    hits = shard.search(vec, 5)
    assert hits[0][0].id == row_id and hits[0][0].shard == 0
    assert hits[0][0].score == pytest.approx(float(vec @ vec), rel=1e-5)
    assert hits[0][0].uri == f"file:///photos/{row_id}.jpg"
    assert [h.score for h in hits[0]] == sorted((h.score for h in hits[0]), reverse=True)
    assert shard.memory_bytes() > 0

    # re-running with no new data: nothing built, manifest untouched
    sequence = load_manifest(store).sequence
    assert _build_all(store) == [None, None]
    assert load_manifest(store).sequence == sequence

    # new data (a second part, with one id re-ingested) -> new versions covering both parts
    more_ids, more_uris, more_vecs = _rows(300, seed=1)
    write_store(
        store.root,
        more_ids + ids[:1],
        more_uris + uris[:1],
        np.vstack([more_vecs, vectors[:1]]),
        num_shards=2,
        part_key="1",
    )
    second = _build_all(store)
    assert all(r.version == 2 for r in second)
    manifest = load_manifest(store)
    assert sum(manifest.shards[s].count for s in (0, 1)) == 2700  # the re-ingested id once
    assert sum(r.meta["duplicates_dropped"] for r in second) == 1
    # v2 read v1's base parts and the new part (not the old part again), and accounts for both
    assert all(r.meta["parts"] == store.list_parts(r.shard) for r in second)
    assert all(r.meta["rows_read"] == r.count + r.meta["duplicates_dropped"] for r in second)
    assert all(r.meta["base_parts"][0].endswith(f"base-{r.dir}-00000.parquet") for r in second)
    assert ShardIndex.load(store, 1).version == 2 and ShardIndex.load(store, 1, 1).version == 1


def test_tiny_and_empty_shards_get_flat_versions(tmp_path):
    ids, uris, vectors = _rows(40)
    store = write_store(tmp_path / "s", ids, uris, vectors, num_shards=3)
    # make shard 2 empty whatever the hash says: remove its part before building
    for part in store.list_parts(2):
        os.remove(store.path(part))
    _build_all(store)
    for s in range(3):
        shard = ShardIndex.load(store, s)
        assert shard.meta["kind"] == "flat"
    empty = ShardIndex.load(store, 2)
    assert empty.count == 0 and empty.search(vectors[:2], 5) == [[], []]
    full = ShardIndex.load(store, 0)
    q = full.vector_of(full.id_of(0))
    ids_of = lambda hits: [h.id for h in hits[0]]  # noqa: E731
    assert ids_of(full.search(q, 3)) == ids_of(full.search(q, 3, rerank=False))
    assert ids_of(full.search_exact(q, 3)) == ids_of(full.search(q, 3))


def test_nprobe_is_per_call_and_concurrent_searches_agree(tmp_path):
    ids, uris, vectors = _rows(3000)
    out = tmp_path / "v"
    build_arrays(vectors, ids, uris, out, None, "ip")
    shard = ShardIndex.open_dir(out)
    ivf_nprobe = shard._ivf.nprobe
    queries = vectors[:50] + 0.01
    expected = {p: shard.search(queries, 10, nprobe=p, rerank=False) for p in (1, 4, 32)}
    assert expected[1] != expected[32]  # nprobe changes the answer ...
    assert shard._ivf.nprobe == ivf_nprobe  # ... without touching the shared index

    errors, got = [], {}

    def worker(p):
        try:
            for _ in range(5):
                got[p] = shard.search(queries, 10, nprobe=p, rerank=False)
                assert got[p] == expected[p]
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in (1, 4, 32)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    with pytest.raises(ValueError):
        shard.search(queries[:, :5], 10)
    with pytest.raises(ValueError):
        shard.search(np.full((1, DIM), np.nan, np.float32), 10)


def test_corrupt_or_incomplete_versions_are_refused(tmp_path):
    ids, uris, vectors = _rows(1000)
    store = write_store(tmp_path / "s", ids, uris, vectors, num_shards=1)
    _build_all(store)
    vdir = Path(store.index_version_dir(0, load_manifest(store).shards[0].dir))
    assert ShardIndex.load(store, 0).version == 1

    data = bytearray((vdir / INDEX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (vdir / INDEX_FILE).write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match="checksum"):
        ShardIndex.load(store, 0)
    data[len(data) // 2] ^= 0xFF
    (vdir / INDEX_FILE).write_bytes(bytes(data))
    ShardIndex.load(store, 0)

    original = (vdir / VECTORS_FILE).read_bytes()
    (vdir / VECTORS_FILE).write_bytes(original[:-10])  # truncated
    with pytest.raises(IndexLoadError, match="bytes"):
        ShardIndex.load(store, 0, verify=False)
    (vdir / VECTORS_FILE).write_bytes(original)

    (vdir / META_FILE).rename(vdir / "meta.moved")
    with pytest.raises(IndexLoadError, match="missing"):
        ShardIndex.load(store, 0)
    with pytest.raises(IndexLoadError, match="no version 7"):
        ShardIndex.load(store, 0, version=7)


def test_failed_build_leaves_previous_version_live(tmp_path):
    ids, uris, vectors = _rows(1200)
    store = write_store(tmp_path / "s", ids, uris, vectors, num_shards=1)
    _build_all(store)
    write_store(store.root, *_rows(100, seed=2), num_shards=1, part_key="1")

    def explode(stage: str) -> None:
        if stage == "added":
            raise MemoryError("simulated: the build ran out of memory while adding")

    with pytest.raises(MemoryError):
        build_shard(store, 0, on_stage=explode)
    assert _numbers(store, 0) == [1]  # no half-written version, no temp left
    assert _version_dirs(store, 0) == list_versions(store, 0)
    assert ShardIndex.load(store, 0).version == 1
    assert build_shard(store, 0).version == 2  # and the next build goes through


def test_killed_build_leaves_previous_version_live(tmp_path):
    """SIGKILL a real build process between training and writing: nothing half-written is
    visible, the live version still loads, and the next build succeeds."""
    ids, uris, vectors = _rows(1200)
    store = write_store(tmp_path / "s", ids, uris, vectors, num_shards=1)
    _build_all(store)
    write_store(store.root, *_rows(100, seed=3), num_shards=1, part_key="1")
    marker = tmp_path / "trained"
    script = textwrap.dedent(
        f"""
        import sys
        from index.live.rebuild import build_shard
        from index.storage.store import Store

        def stage(name):
            if name == "trained":
                open({str(marker)!r}, "w").close()
                sys.stdin.read()  # block until killed: the parent never writes

        build_shard(Store({str(store.root)!r}), 0, on_stage=stage)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the build never reached training"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    names = _version_dirs(store, 0)
    assert [n for n in names if n.startswith("v")] == list_versions(store, 0)
    assert any(n.startswith(".tmp-") for n in names)  # the killed build's hidden scratch
    assert _numbers(store, 0) == [1]
    live = ShardIndex.load(store, 0)
    assert live.version == 1 and live.count == 1200
    result = build_shard(store, 0)
    commit_results(store, [result])
    assert ShardIndex.load(store, 0).version == result.version == 2
    assert ShardIndex.load(store, 0).count == 1300


def test_object_store_versions_become_visible_only_through_the_manifest(tmp_path, monkeypatch):
    """memory:// stands in for an object store (no rename): a partial upload is not live."""
    root = f"memory://vs-test-{os.getpid()}-{time.time_ns()}"
    ids, uris, vectors = _rows(800)
    store = write_store(root, ids, uris, vectors, num_shards=1)
    assert not store.is_local
    monkeypatch.setenv("VISUAL_SEARCH_CACHE", str(tmp_path / "cache"))
    _build_all(store)
    assert ShardIndex.load(store, 0).version == 1
    # a crashed upload of version 2: some files, no meta.json, manifest not updated
    partial = store.index_version_dir(0, "v000002-0badc0de")
    store.write_bytes(f"{partial}/{INDEX_FILE}", b"half an index")
    assert ShardIndex.load(store, 0).version == 1
    with pytest.raises(IndexLoadError):
        ShardIndex.load(store, 0, version=2)
    write_store(root, *_rows(50, seed=4), num_shards=1, part_key="1")
    result = build_shard(store, 0)
    assert result.version == 3  # never reuses the orphaned number
    commit_results(store, [result])
    assert ShardIndex.load(store, 0).count == 850


def test_build_measures_default_nprobe_and_candidates(tmp_path):
    ids, uris, vectors = _rows(3000)
    meta = build_arrays(vectors, ids, uris, tmp_path / "tuned", None, "ip")
    tuning = meta["tuning"]
    assert meta["nprobe"] == tuning["nprobe"] and meta["candidates"] == tuning["candidates"]
    assert tuning["reason"] in meta["spec"]["reasons"]
    reached = [t for t in tuning["table"] if t["recall"] >= tuning["target"]]
    assert reached, "this easy data reaches the target"
    fewest = min(t["candidates"] for t in reached)
    assert tuning["candidates"] == fewest
    smallest = min(t["nprobe"] for t in reached if t["candidates"] == fewest)
    assert tuning["nprobe"] == max(smallest, min(8, meta["nlist"]))  # floor of 8 lists
    at_chosen = [t for t in tuning["table"] if t["candidates"] == fewest]
    best = max(t["recall"] for t in at_chosen)  # what more lists stop adding, before the floor
    saturated = min(t["nprobe"] for t in at_chosen if t["recall"] >= best - SATURATED)
    enough = max(saturated, smallest)
    assert tuning["saturated_nprobe"] == enough
    shard = ShardIndex.open_dir(tmp_path / "tuned")
    assert shard.default_nprobe == tuning["nprobe"]
    # a version built before ``saturated_nprobe`` was recorded: read from the tuning's table
    older = {**meta, "tuning": {k: v for k, v in tuning.items() if k != "saturated_nprobe"}}
    assert saturated_nprobe(older) == enough and saturated_nprobe({"tuning": None}) is None

    plain = build_arrays(vectors, ids, uris, tmp_path / "plain", None, "ip", tune=False)
    assert plain["tuning"] is None and plain["candidates"] == 0
    assert default_candidates(10) == 100 and default_candidates(50) == 200
    assert default_candidates(10, 400) == 400 and default_candidates(100, 400) == 4000
    assert default_candidates(1000, 800) == 10_000  # scaled with k, capped


def test_every_build_applies_and_records_tombstones_and_keeps_ids_compact(tmp_path):
    """The one build path: a delete is applied by any build (build_index.py's too), recorded in
    the version, and an id deleted then added again is visible after it. Row ids are stored by
    their own length: one 256-character id does not widen every row."""
    import pyarrow as pa

    from index.live.parts import write_rows, write_tombstones
    from index.rows import schema

    ids, uris, vectors = _rows(1200)
    store = write_store(tmp_path / "s", ids, uris, vectors, num_shards=1)
    _build_all(store)
    part, ms = write_tombstones(store, 0, [ids[3], ids[4]])
    again = pa.scalar(ms + 1, schema.TIMESTAMP)  # ids[4] comes back after its delete
    write_rows(
        store, 0, schema.embeddings_table([ids[4]], ["again"], vectors[4:5], ingested_at=again)
    )
    long_id = "x" * 256
    write_rows(store, 0, schema.embeddings_table([long_id], ["long"], vectors[5:6]))
    (result,) = _build_all(store)
    assert part in result.meta["tombstone_parts"]
    shard = ShardIndex.load(store, 0)
    assert shard.row_key(ids[3]) is None  # deleted
    assert shard.uri_of(shard.row_key(ids[4])) == "again"  # deleted, then added again: visible
    assert shard.row_key(long_id) is not None and shard.count == 1200 - 1 + 1
    id_bytes = sum(len(i) for i in ids) + 256
    assert shard._rows.ids.nbytes < id_bytes + 8 * (shard.count + 1) + 64  # offsets + bytes
