"""A shard holder's readiness is judged now, from the newest manifest it read (REVIEW-9d94e46
1.11): a shard that had no index at start-up but has a live version now is not ready until
that version (or an older one that loads) is served; and a holder that starts serves only
once caught up with the store (issue #23, seed 2202)."""

from __future__ import annotations

import os

import numpy as np

from harness.stores import write_store
from index.live.parts import write_rows, write_tombstones
from index.live.rebuild import rebuild_shard
from index.rows import schema
from index.storage.manifest import load_manifest
from index.storage.store import Store
from serve.deployments.shard_holder import ShardHolder


def test_ready_follows_the_live_version_not_the_start_up_state(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    ids = [f"r{i}" for i in range(len(x))]
    store = write_store(tmp_path / "s", ids, ids, x, 1)
    holder = ShardHolder(store, 0, "replica", load_manifest(store))  # no index yet: delta only
    assert holder.ready()["ready"] and holder.ready()["live_dir"] is None
    rebuild_shard(store, 0)
    manifest = load_manifest(store)
    live = manifest.shards[0].dir
    os.remove(os.path.join(store.index_version_dir(0, live), "index.faiss"))  # it cannot load
    holder.poll(manifest, delta=True)
    row = holder.ready()
    assert row["loaded"] and not row["ready"] and row["live_dir"] == live, row
    assert holder.stats()["reload_error"]


class RacingStore(Store):
    """A store whose first ``n`` part listings are each followed by a writer's new part (and a
    delete of an earlier row): what a replica that (re)starts on a busy shard sees."""

    def __init__(self, root, writes: int):
        super().__init__(root)
        self.writes = writes
        self.written: list[str] = []
        self.deleted: list[str] = []

    def list_parts(self, shard: int) -> list[str]:
        listed = super().list_parts(shard)
        if len(self.written) < self.writes:
            n = len(self.written)
            row_id = f"late-{n}"
            table = schema.embeddings_table([row_id], [row_id], np.ones((1, 8), np.float32))
            write_rows(self, shard, table)
            self.written.append(row_id)
            write_tombstones(self, shard, [f"r{n}"])
            self.deleted.append(f"r{n}")
        return listed


def test_a_starting_replica_serves_only_once_caught_up_with_the_store(tmp_path):
    """Issue #23, seed 2202: rows and deletes written while a replica loaded were missing from
    it after it said ready (their writers had been answered ``searchable: false``). The first
    load now refreshes until a listing finds nothing new."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    ids = [f"r{i}" for i in range(len(x))]
    write_store(tmp_path / "s", ids, ids, x, 1)
    rebuild_shard(Store(str(tmp_path / "s")), 0)
    store = RacingStore(str(tmp_path / "s"), writes=3)
    holder = ShardHolder(store, 0, "replica", load_manifest(store))
    assert store.written == ["late-0", "late-1", "late-2"]  # each after a listing
    view = holder.view
    assert all(view.record_of(row_id) is not None for row_id in store.written)
    assert all(view.record_of(row_id) is None for row_id in store.deleted)
    assert view.record_of("r3") is not None
