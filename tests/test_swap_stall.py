"""A shard replica keeps answering while it swaps to a new version.

``ShardHolder.load_live`` used to build the new view (``LiveShard.rebased``: a new view, every
delta part not covered and every tombstone part re-applied, with base lookups) while holding the
holder's ``swap_lock`` *and* the old view's lock. Everything a replica answers besides searches
waited out that rebase: hand-overs (``swap_lock``), lookups by id (``record_of``, ``vector_of``)
and the write stamp, which ``ShardSearcher.stamp`` takes on the replica's event loop, so one stamp
froze every request of the replica. Now only copying slices holds the old view's lock, and
``swap_lock`` covers only the hand-overs made during the rebase.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from harness.polling import finishes_within
from harness.stores import write_store
from index.live.delta import LiveShard
from index.live.parts import write_rows, write_tombstones
from index.live.rebuild import RebuildOptions, rebuild_shard
from index.rows import schema
from index.storage.manifest import load_manifest
from serve.deployments.shard_holder import ShardHolder

DIM = 8
PROMPT_S = 1.0  # far above the microseconds these take; far below the held rebase


def _write(store, row_id: str, vector: np.ndarray) -> str:
    table = schema.embeddings_table([row_id], [f"mem://{row_id}"], vector.reshape(1, -1))
    return write_rows(store, 0, table)


def _prompt(fn, *args):
    """``fn(*args)`` on a thread; (finished within PROMPT_S, its result)."""
    return finishes_within(PROMPT_S, fn, *args)


def test_stamps_lookups_and_hand_overs_do_not_wait_out_a_swap(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((60, DIM)).astype(np.float32)
    ids = [f"b{i:03d}" for i in range(len(x))]
    store = write_store(tmp_path / "s", ids, ids, x, 1)
    rebuild_shard(store, 0)
    holder = ShardHolder(store, 0, "replica", load_manifest(store))
    old = holder.view
    _write(store, "early", x[0])  # in the old view's delta, covered by the next version
    assert old.refresh() == 1
    rebuild_shard(store, 0, RebuildOptions(force=True))  # the next live version
    new_manifest = load_manifest(store)
    # after that build: delta rows and a delete the rebase must carry over to the new view
    for i in range(3):
        _write(store, f"late-{i}", rng.standard_normal(DIM).astype(np.float32))
    write_tombstones(store, 0, ["b001"])
    assert old.refresh() == 4

    entered, release = threading.Event(), threading.Event()
    add_rows = LiveShard._add_rows

    def held(self, *args, **kwargs):  # the rebase of the new view, held until released
        if self is not old and not release.is_set():
            entered.set()
            release.wait(10)
        return add_rows(self, *args, **kwargs)

    monkeypatch.setattr(LiveShard, "_add_rows", held)
    swap = threading.Thread(target=holder.load_live, args=(new_manifest,), daemon=True)
    swap.start()
    try:
        assert entered.wait(10), "the rebase never re-applied a delta part"
        start = time.perf_counter()
        done, stamp = _prompt(holder.stamp, ["b002"])
        assert done and stamp > 0, "a stamp waited for the swap (the replica's event loop with it)"
        done, record = _prompt(holder.view.record_of, "late-0")
        assert done and record is not None, "GET /images/{id} waited for the swap"
        vector = rng.standard_normal(DIM).astype(np.float32)
        part = _write(store, "during", vector)
        args = ("add_rows", part, ["during"], ["mem://during"], vector.reshape(1, -1), [stamp])
        done, answer = _prompt(holder.hand_over, *args)
        assert done and answer["applied"], "a hand-over waited for the swap"
        assert time.perf_counter() - start < 3 * PROMPT_S
    finally:
        release.set()
        swap.join(30)
    assert not swap.is_alive()
    view = holder.view
    assert view is not old and view.version_dir == new_manifest.shards[0].dir
    # the new view has the old one's delta, its delete and the row handed over mid-swap
    assert all(view.record_of(f"late-{i}") is not None for i in range(3))
    assert view.record_of("during") is not None and view.record_of("early") is not None
    assert view.stats()["delta"] == 4  # late-0..2 and during; "early" is in the new base
    assert view.record_of("b001") is None and view.record_of("b002") is not None
