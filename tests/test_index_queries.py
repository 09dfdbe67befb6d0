"""Every search entry point of the index holds queries to one rule (``index.ann.queries``): one
vector or an ``(n, dim)`` array of finite numbers, and ``k >= 1``, refused with ``ValueError``
otherwise: on a loaded version (``ShardIndex``: search, filtered search, exact search) and on a
live shard with and without a base version (``LiveShard``: search, filtered search, exact
search). No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from harness.stores import write_store
from index.ann.queries import check_k, check_queries
from index.ann.shard_index import ShardIndex
from index.live.delta import LiveShard, load_live_shard
from index.live.parts import write_rows
from index.live.rebuild import rebuild_shard
from index.query.filters import Exists, Not
from index.rows import schema
from index.storage.manifest import load_manifest

DIM = 8
ANY = Not(Exists("colour"))  # every row: no row has the column


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A loaded version, a live shard over it with a delta row, and a delta-only live shard."""
    rng = np.random.default_rng(7)
    x = unit(rng.standard_normal((40, DIM)))
    ids = [f"r{i:02d}" for i in range(40)]
    store = write_store(tmp_path_factory.mktemp("s"), ids, [f"/p/{i}" for i in ids], x, 1)
    rebuild_shard(store, 0)
    name = load_manifest(store).shards[0].dir
    version = ShardIndex.load(store, 0, name)
    live = load_live_shard(store, 0, name, DIM, "ip")
    fresh = unit(rng.standard_normal((1, DIM)))
    part = write_rows(store, 0, schema.embeddings_table(["new"], ["/q/new"], fresh))
    live.add_rows(part, ["new"], ["/q/new"], fresh, [schema.now_ms().value])
    delta_only = LiveShard(store, 0, None, DIM, "ip")
    delta_only.add_rows("part-x.parquet", ["d0"], ["/q/d0"], fresh, [1])
    return {"version": version, "live": live, "delta_only": delta_only}


ENTRIES = {
    "ShardIndex.search": ("version", lambda s, q, k: s.search(q, k)),
    "ShardIndex.search_filtered": ("version", lambda s, q, k: s.search_filtered(q, k, ANY)[0]),
    "ShardIndex.search_exact": ("version", lambda s, q, k: s.search_exact(q, k)),
    "LiveShard.search": ("live", lambda s, q, k: s.search(q, k)),
    "LiveShard.search(filter)": ("live", lambda s, q, k: s.search(q, k, filter=ANY)),
    "LiveShard.search_with_plan": ("live", lambda s, q, k: s.search_with_plan(q, k)[0]),
    "LiveShard.search_exact": ("live", lambda s, q, k: s.search_exact(q, k)),
    "LiveShard.search, no base": ("delta_only", lambda s, q, k: s.search(q, k)),
    "LiveShard.search(filter), no base": (
        "delta_only",
        lambda s, q, k: s.search(q, k, filter=ANY),
    ),
    "LiveShard.search_exact, no base": ("delta_only", lambda s, q, k: s.search_exact(q, k)),
}


def _query(bad: float | None = None, shape: tuple[int, ...] = (2, DIM)) -> np.ndarray:
    q = np.full(shape, 1 / np.sqrt(DIM), np.float32)
    if bad is not None:
        q.flat[3] = bad
    return q


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_every_search_entry_takes_a_good_query_and_refuses_bad_ones(shards, entry):
    which, call = ENTRIES[entry]
    shard = shards[which]
    assert len(call(shard, _query(), 3)) == 2
    assert len(call(shard, _query(shape=(DIM,)), 3)) == 1  # one vector: a batch of one
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="queries contain NaN or infinity"):
            call(shard, _query(bad), 3)
        with pytest.raises(ValueError, match="queries contain NaN or infinity"):
            call(shard, _query(bad, shape=(DIM,)), 3)
    with pytest.raises(ValueError, match=rf"queries must be \(n, {DIM}\), got shape \(2, 7\)"):
        call(shard, _query(shape=(2, DIM - 1)), 3)
    with pytest.raises(ValueError, match=rf"queries must be \(n, {DIM}\), got shape \(1, 2, 8\)"):
        call(shard, _query(shape=(1, 2, DIM)), 3)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        call(shard, _query(), 0)


def test_check_queries_shapes_and_types():
    q = check_queries([1, 2, 3], 3)
    assert q.shape == (1, 3) and q.dtype == np.float32 and q.flags.c_contiguous
    wide = np.arange(12, dtype=np.float64).reshape(3, 4)[:, :3]  # not contiguous, float64
    q = check_queries(wide, 3)
    assert q.dtype == np.float32 and q.flags.c_contiguous and np.array_equal(q, wide)
    assert check_queries(np.zeros((0, 3)), 3).shape == (0, 3)
    with pytest.raises(ValueError, match="NaN or infinity"):
        check_queries([1e39, 0, 0], 3)  # finite in float64, infinite as the float32 searched
    check_k(1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        check_k(-1)
