"""The delta, tombstones and background rebuild at the index level (no Ray): real Parquet parts,
real FAISS versions, the same functions the Serve app and the rebuild task call."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from index import schema
from index.build import build_shard, commit_results, list_versions
from index.delta import LiveShard, load_live_shard, write_rows, write_tombstones
from index.manifest import load_manifest
from index.shard_index import ShardIndex
from pipelines.rebuild import RebuildOptions, collect_garbage, pending, rebuild_shard
from tests.helpers import write_store

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
    commit_results(store, [build_shard(store, 0)])
    return store, ids, x, centers


def add(store, ids, vectors, ingested_ms=None):
    at = None if ingested_ms is None else pa.scalar(ingested_ms, schema.TIMESTAMP)
    table = schema.embeddings_table(ids, [f"mem://{i}" for i in ids], vectors, ingested_at=at)
    return write_rows(store, 0, table), table


def top_ids(view, q, k=10):
    return [h.id for h in view.search(q, k)[0]]


def test_delta_tombstones_and_rebuild_keep_visibility(store):
    store, ids, x, centers = store
    rng = np.random.default_rng(1)
    view = load_live_shard(store, 0, load_manifest(store).shards[0].version, DIM, "ip")
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
    other = load_live_shard(store, 0, view.version, DIM, "ip")  # a fresh replica agrees
    assert ids[5] not in top_ids(other, x[5]) and other.stats()["delta"] == 49

    # an id deleted and added again is visible again (its newest row wins)
    add(store, [ids[5]], x[5:6], ingested_ms=ms + 1)  # hidden iff deleted_at >= ingested_at
    view.refresh()
    assert top_ids(view, x[5])[0] == ids[5]

    # rebuild: folds the delta in, applies the tombstones, reuses the quantizer (no drift)
    todo = pending(store, 0)
    assert len(todo["parts"]) == 3 and len(todo["tombstone_parts"]) == 1
    summary = rebuild_shard(store.uri, 0, RebuildOptions(grace_s=3600))
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
    assert rebuild_shard(store.uri, 0)["built"] is False  # nothing new: a no-op

    # a delete after the rebuild: hidden in the base through the IDSelector, until the next one
    tomb2, ms2 = write_tombstones(store, 0, [new_ids[30]])
    rebased.add_tombstones(tomb2, [new_ids[30]], [ms2])
    assert new_ids[30] not in top_ids(rebased, new[30])
    assert rebased.stats()["hidden_base_rows"] == 1

    # drifted data (far from every centroid) -> retrain; GC keeps live + previous within grace
    far = unit(rng, 3000)
    add(store, [f"f{i:04d}" for i in range(3000)], far)
    summary = rebuild_shard(store.uri, 0, RebuildOptions(grace_s=3600))
    assert summary["built"] and summary["retrained"], summary
    live = load_manifest(store).shards[0]
    assert list_versions(store, 0) == [live.version - 1, live.version]
    assert collect_garbage(store, 0, grace_s=0) == [live.version - 1]
    assert list_versions(store, 0) == [live.version]
    final = load_live_shard(store, 0, live.version, DIM, "ip")
    assert new_ids[30] not in top_ids(final, new[30]) and final.stats()["hidden_base_rows"] == 0


def test_gc_keeps_the_newest_version_that_loads_when_the_live_one_is_broken(tmp_path):
    """Searchers serve (and restart on) the newest version that loads; GC must not delete it."""
    import os

    from index.build import build_shard, commit_results

    rng = np.random.default_rng(3)
    x = unit(rng, 400)
    store = write_store(tmp_path / "s", [f"r{i}" for i in range(400)], [""] * 400, x, 1)
    for _ in range(2):  # v1, v2: good
        commit_results(store, [build_shard(store, 0, force=True)])
    broken = build_shard(store, 0, force=True)  # v3: a file lost after it was committed
    commit_results(store, [broken])
    os.remove(os.path.join(store.index_version_dir(0, broken.version), "vectors.npy"))
    assert collect_garbage(store, 0, grace_s=0) == []  # v2 serves; v1 is its previous
    assert list_versions(store, 0) == [1, 2, 3]
    commit_results(store, [build_shard(store, 0, force=True)])  # v4: good again
    assert collect_garbage(store, 0, grace_s=3600) == [1, 2]  # v3 is v4's previous: grace
    assert collect_garbage(store, 0, grace_s=0) == [3]
    assert list_versions(store, 0) == [4]


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
