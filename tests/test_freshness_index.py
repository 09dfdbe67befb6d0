"""The delta, tombstones and background rebuild at the index level (no Ray): real Parquet parts,
real FAISS versions, the same functions the Serve app and the rebuild task call."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from harness.stores import write_store
from index.ann.shard_index import ShardIndex
from index.live.delta import LiveShard, load_live_shard
from index.live.parts import write_rows, write_tombstones
from index.live.rebuild import RebuildOptions, build_shard, rebuild_shard
from index.rows import schema
from index.storage.coverage import plan_shard
from index.storage.gc import collect_garbage
from index.storage.leases import write_lease
from index.storage.manifest import load_manifest
from index.storage.publish import commit_results, list_versions

pytestmark = pytest.mark.slow

DIM = 32


def unit(rng, n, dim=DIM, center=None):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    if center is not None:
        x = x * 0.1 + center
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    # a mixture, so the coarse quantizer has structure the drift rule can measure
    centers = unit(rng, 20)
    x = unit(rng, 6000, center=centers[rng.integers(0, 20, 6000)])
    ids = [f"b{i:05d}" for i in range(len(x))]
    store = write_store(tmp_path / "s", ids, [f"mem://{i}" for i in ids], x, 1)
    rebuild_shard(store, 0)
    return store, ids, x, centers


def live_dir(store):
    return load_manifest(store).shards[0].dir


def add(store, ids, vectors, ingested_ms=None):
    at = None if ingested_ms is None else pa.scalar(ingested_ms, schema.TIMESTAMP)
    table = schema.embeddings_table(ids, [f"mem://{i}" for i in ids], vectors, ingested_at=at)
    return write_rows(store, 0, table), table


def top_ids(view, q, k=10):
    return [h.id for h in view.search(q, k)[0]]


def test_delta_tombstones_and_rebuild_keep_visibility(store):
    store, ids, x, centers = store
    rng = np.random.default_rng(1)
    view = load_live_shard(store, 0, live_dir(store), DIM, "ip")
    assert view.base.meta["kind"] == "ivfpq" and view.stats()["delta"] == 0
    assert top_ids(view, x[5])[0] == ids[5]

    # rows written as a new part: found by a refresh (another replica) or handed over (the writer)
    new = unit(rng, 50, center=centers[rng.integers(0, 20, 50)])
    new_ids = [f"n{i:03d}" for i in range(50)]
    part, table = add(store, new_ids[:25], new[:25])
    assert view.refresh() == 1 and view.refresh() == 0
    part2, table2 = add(store, new_ids[25:], new[25:])
    ingested = [int(table2[schema.INGESTED_AT][0].value)] * 25
    view.add_rows(part2, new_ids[25:], table2[schema.URI].to_pylist(), new[25:], ingested)
    assert view.refresh() == 0  # the handed-over part is not read again
    assert view.stats()["delta"] == 50
    for i in (0, 30, 49):
        hits = view.search(new[i], 10)[0]
        assert hits[0].id == new_ids[i] and hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert np.allclose(view.vector_of(new_ids[i]), new[i], atol=1e-3)

    # deletes hide a base row and a delta row at once; k visible results still come back
    gone = [ids[5], new_ids[3]]
    tomb, ms = write_tombstones(store, 0, gone)
    view.add_tombstones(tomb, gone, [ms, ms])
    for row_id, q in ((ids[5], x[5]), (new_ids[3], new[3])):
        got = top_ids(view, q, 10)
        assert row_id not in got and len(got) == 10
        assert view.vector_of(row_id) is None
    other = load_live_shard(store, 0, view.version_dir, DIM, "ip")  # a fresh replica agrees
    assert ids[5] not in top_ids(other, x[5]) and other.stats()["delta"] == 49

    # an id deleted and added again is visible again (its newest row wins)
    add(store, [ids[5]], x[5:6], ingested_ms=ms + 1)  # hidden iff deleted_at >= ingested_at
    view.refresh()
    assert top_ids(view, x[5])[0] == ids[5]

    # rebuild: folds the delta in, applies the tombstones, reuses the quantizer (no drift)
    todo = plan_shard(store, 0)
    assert len(todo.new_parts) == 3 and len(todo.new_tombstones) == 1 and not todo.up_to_date
    summary = rebuild_shard(store, 0)
    assert summary["built"] and not summary["retrained"], summary
    assert "reuse" in summary["reason"]
    base = ShardIndex.load(store, 0)
    assert base.version == summary["version"] and base.count == 6000 + 50 - 1
    assert base.row_key(new_ids[3]) is None and base.row_key(ids[5]) is not None
    rebased = view.rebased(base)
    assert rebased.stats()["delta"] == 0 and rebased.stats()["hidden_base_rows"] == 0
    assert top_ids(rebased, x[5])[0] == ids[5]
    assert new_ids[3] not in top_ids(rebased, new[3])
    assert top_ids(rebased, new[30])[0] == new_ids[30]
    assert rebuild_shard(store, 0)["built"] is False  # nothing new: a no-op

    # a delete after the rebuild: hidden in the base through the IDSelector, until the next one
    tomb2, ms2 = write_tombstones(store, 0, [new_ids[30]])
    rebased.add_tombstones(tomb2, [new_ids[30]], [ms2])
    assert new_ids[30] not in top_ids(rebased, new[30])
    assert rebased.stats()["hidden_base_rows"] == 1

    # drifted data (far from every centroid) -> retrain
    far = unit(rng, 3000)
    add(store, [f"f{i:04d}" for i in range(3000)], far)
    summary = rebuild_shard(store, 0)
    assert summary["built"] and summary["retrained"], summary
    live = load_manifest(store).shards[0]
    versions = list_versions(store, 0)
    assert len(versions) == 3 and versions[-1] == live.dir
    # GC: nothing within the grace period; then the old versions, every part and tombstone part
    # the live version folded in, and the old versions' base parts: a few base parts remain
    assert collect_garbage(store, 0, grace_s=3600)["versions"] == []
    gone = collect_garbage(store, 0, grace_s=0)
    assert gone["versions"] == versions[:2] and gone["waiting"] is None
    assert list_versions(store, 0) == [live.dir]
    assert store.list_parts(0) == [] and store.list_tombstone_parts(0) == []
    assert store.list_base_parts(0) == ShardIndex.load(store, 0).meta["base_parts"]
    final = load_live_shard(store, 0, live.dir, DIM, "ip")
    assert new_ids[30] not in top_ids(final, new[30]) and final.stats()["hidden_base_rows"] == 0
    assert final.count == 6000 + 50 - 1 - 1 + 3000 and final.stats()["delta"] == 0
    # a copy of a deleted row that arrives late (written before the delete) stays hidden: the
    # live version keeps the deletes it applied (tombstones.parquet) after the parts are gone
    add(store, [new_ids[30]], new[30:31], ingested_ms=ms2 - 1)
    final.refresh()
    assert new_ids[30] not in top_ids(final, new[30])
    assert rebuild_shard(store, 0)["built"]
    assert ShardIndex.load(store, 0).row_key(new_ids[30]) is None


def test_gc_keeps_the_newest_version_that_loads_when_the_live_one_is_broken(tmp_path):
    """Searchers serve (and restart on) the newest version that loads; GC must not delete it."""
    import os

    rng = np.random.default_rng(3)
    x = unit(rng, 400)
    store = write_store(tmp_path / "s", [f"r{i}" for i in range(400)], [""] * 400, x, 1)
    force = RebuildOptions(force=True)
    for _ in range(2):  # v1, v2: good
        commit_results(store, [build_shard(store, 0, force)])
    v1, v2 = list_versions(store, 0)
    broken = build_shard(store, 0, force)  # v3: a file lost after it was committed
    commit_results(store, [broken])
    os.remove(os.path.join(store.index_version_dir(0, broken.dir), "vectors.npy"))
    # v2 serves (the anchor); v1 may go, v3 (live, broken) stays for whoever repairs it
    assert collect_garbage(store, 0, grace_s=0)["versions"] == [v1]
    assert list_versions(store, 0) == [v2, broken.dir]
    commit_results(store, [build_shard(store, 0, force)])  # v4: good again
    assert collect_garbage(store, 0, grace_s=3600)["versions"] == []  # within the grace
    assert collect_garbage(store, 0, grace_s=0)["versions"] == [v2, broken.dir]
    assert len(list_versions(store, 0)) == 1


def test_gc_never_deletes_a_version_a_replica_serves(tmp_path):
    """Replicas report their version in a lease; GC waits for them, not for a timer alone, and
    keeps the parts an older served version still reads as its delta."""
    rng = np.random.default_rng(4)
    x = unit(rng, 300)
    store = write_store(tmp_path / "s", [f"r{i}" for i in range(300)], [""] * 300, x, 1)
    rebuild_shard(store, 0)
    old = live_dir(store)
    replica = load_live_shard(store, 0, old, DIM, "ip")
    write_lease(store, 0, "replica-a", old)  # replica-a serves the old version
    part, _ = add(store, ["late"], unit(rng, 1))
    assert rebuild_shard(store, 0)["built"]
    waiting = collect_garbage(store, 0, grace_s=0)
    assert waiting["versions"] == [] and "still served" in waiting["waiting"]
    assert part in store.list_parts(0)  # the old version reads it as its delta: kept
    replica.refresh()
    assert top_ids(replica, unit(np.random.default_rng(4), 1)[0])  # still serving, files intact
    write_lease(store, 0, "replica-a", live_dir(store))  # it swapped
    assert collect_garbage(store, 0, grace_s=0)["versions"] == [old]
    assert part not in store.list_parts(0)
    # a replica that stopped renewing its lease stops holding anything once it expires
    rebuild_shard(store, 0, RebuildOptions(force=True))
    now = __import__("time").time() + 3600
    assert collect_garbage(store, 0, grace_s=0, now=now)["versions"] != []


def test_delta_only_shard_and_l2(tmp_path):
    """A shard with no index yet serves its delta alone; l2 scores are distances (lower first)."""
    rng = np.random.default_rng(2)
    x = unit(rng, 20)
    store = write_store(tmp_path / "s", [f"a{i}" for i in range(20)], ["u"] * 20, x, 1, "l2")
    view = LiveShard(store, 0, None, DIM, "l2")
    view.refresh()
    hits = view.search(x[7], 3)[0]
    assert hits[0].id == "a7" and hits[0].score == pytest.approx(0.0, abs=1e-3)
    assert hits[0].score <= hits[1].score <= hits[2].score
    assert view.count == 20


def test_the_grace_runs_by_the_collectors_clock_too(tmp_path):
    """``live_since`` is the committer's wall clock; a committer an hour behind GC made the
    grace look long over already (review 1.2, the grace clock). With ``seen_for_s`` (how long
    the collector has seen the live version, its own clock) the grace waits for both."""
    rng = np.random.default_rng(6)
    store = write_store(
        tmp_path / "s", [f"r{i}" for i in range(200)], [""] * 200, unit(rng, 200), 1
    )
    rebuild_shard(store, 0)
    old = live_dir(store)
    assert rebuild_shard(store, 0, RebuildOptions(force=True))["built"]
    ahead = __import__("time").time() + 3600  # GC an hour ahead = a committer an hour behind
    held = collect_garbage(store, 0, grace_s=60, now=ahead, seen_for_s=5.0)
    assert held["versions"] == [] and held["waiting"].startswith("grace: 55s"), held
    assert old in list_versions(store, 0)
    assert collect_garbage(store, 0, grace_s=60, now=ahead, seen_for_s=61.0)["versions"] == [old]
