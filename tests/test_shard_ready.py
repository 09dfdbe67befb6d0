"""A shard holder's readiness is judged now, from the newest manifest it read (REVIEW-9d94e46
1.11): a shard that had no index at start-up but has a live version now is not ready until
that version (or an older one that loads) is served."""

from __future__ import annotations

import os

import numpy as np

from harness.stores import write_store
from index.live.rebuild import rebuild_shard
from index.storage.manifest import load_manifest
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
