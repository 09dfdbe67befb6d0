"""Writes of one id are ordered by its shard, not by wall clocks (review 1.5, issue #23).

A delete on a process whose clock runs a minute ahead, then a re-add on another whose clock runs
a minute behind: by wall clocks the re-add is older than the tombstone and stays hidden for
good. The serving app stamps every write with its shard's replica (``ShardHolder.stamp``, a
hybrid logical clock: ``index.rows.clock``), which stamps after every write of the id it knows,
so the re-add shows. A write whose shard cannot stamp is refused with 503 and nothing written.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pyarrow as pa
import pytest

from harness.stores import write_store
from index.live.parts import write_rows, write_tombstones
from index.live.rebuild import rebuild_shard
from index.rows import clock, schema
from index.storage.manifest import load_manifest
from serve.catalog import Catalog
from serve.deployments.shard_holder import ShardHolder
from serve.http.errors import ApiError
from serve.writes import RowWriter

DIM = 8


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100, DIM)).astype(np.float32)
    ids = [f"r{i}" for i in range(len(x))]
    store = write_store(tmp_path / "s", ids, ids, x, 1)
    rebuild_shard(store, 0)
    return store


def a_new_process(monkeypatch, skew_ms: int) -> None:
    """This process's clock as a fresh process with ``skew_ms`` would have it."""
    monkeypatch.setattr(clock, "_last", 0)
    monkeypatch.setattr(clock, "_skew_ms", skew_ms)


def test_a_re_add_after_a_delete_shows_whatever_the_clocks(store, monkeypatch):
    manifest = load_manifest(store)
    a_new_process(monkeypatch, +60_000)  # replica 1: a minute ahead
    first = ShardHolder(store, 0, "replica-1", manifest)
    deleted_ms = first.stamp(["r5"])
    part, deleted_ms = write_tombstones(store, 0, ["r5"], deleted_ms)
    first.hand_over("add_tombstones", part, ["r5"], [deleted_ms])
    assert first.view.record_of("r5") is None

    a_new_process(monkeypatch, -60_000)  # replica 2 (replica 1 died): a minute behind
    assert clock.now_ms() < deleted_ms  # its wall clock alone would order the re-add first
    second = ShardHolder(store, 0, "replica-2", manifest)
    added_ms = second.stamp(["r5"])
    assert added_ms > deleted_ms
    vector = np.ones((1, DIM), np.float32)
    table = schema.embeddings_table(
        ["r5"], ["again"], vector, ingested_at=pa.scalar(added_ms, schema.TIMESTAMP)
    )
    part = write_rows(store, 0, table)
    second.hand_over("add_rows", part, ["r5"], ["again"], vector, [added_ms])
    assert second.view.record_of("r5")["uri"] == "again"
    # and a rebuild that folds both in agrees (the same visibility rule, vectorised)
    rebuild_shard(store, 0)
    second.poll(load_manifest(store), delta=True)
    assert second.view.record_of("r5")["uri"] == "again"


def test_a_write_another_replica_took_orders_the_stamp_once_polled(store, monkeypatch):
    """A delete another replica of the shard stamped (a minute ahead) and this one read by its
    poll: this replica's stamps for that id come after it, though its clock runs behind."""
    manifest = load_manifest(store)
    holder = ShardHolder(store, 0, "replica", manifest)
    a_new_process(monkeypatch, +60_000)
    _, ahead_ms = write_tombstones(store, 0, ["r7"], clock.now_ms())  # another replica's
    a_new_process(monkeypatch, -60_000)
    holder.poll(None, delta=True)  # its next delta poll (every delta_poll_s)
    assert holder.stamp(["r7"]) > ahead_ms


def test_a_write_whose_shard_cannot_stamp_is_refused_and_not_made(store):
    async def no_answer(shard, ids):
        await asyncio.sleep(10)

    async def unused(*args):
        raise AssertionError("nothing is handed over")

    writer = RowWriter(store, Catalog(store, load_manifest(store)), unused, unused, no_answer, 0.2)
    started = time.monotonic()
    with pytest.raises(ApiError) as refused:
        asyncio.run(writer.delete("r3"))
    assert (refused.value.status, refused.value.error) == (503, "shard_unavailable")
    assert "nothing was written" in refused.value.detail
    assert time.monotonic() - started < 5
    assert store.list_tombstone_parts(0) == []
