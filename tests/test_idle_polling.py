"""An idle replica polls the store less (issue #24.4): its delta and manifest polls back off while
nothing changes, and a search (or a write, or a stamp) brings them back and catches it up."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from harness.polling import wait_for
from harness.stores import write_store
from index.live.parts import write_rows
from index.live.rebuild import rebuild_shard
from index.rows import schema
from serve.config import ConfigError, ServeConfig
from serve.deployments.idle import Backoff
from serve.deployments.searcher import ShardSearcher

DIM = 8


def test_backoff_doubles_to_its_cap_while_unused_and_resets_on_use():
    idle = Backoff(0.5, 4.0, idle_after_s=0)
    assert [idle.quiet() for _ in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert idle.touch() is True and idle.wait_s == 0.5  # backed off: poll now
    assert idle.touch() is False  # already at the interval
    in_use = Backoff(0.5, 4.0, idle_after_s=60)
    assert in_use.quiet() == 0.5  # used within idle_after_s: the interval stands
    assert Backoff(0.5, None).quiet() == 0.5  # no cap: no backoff


def test_the_config_refuses_negative_caps():
    with pytest.raises(ConfigError, match="delta_poll_idle_max_s"):
        ServeConfig(store="/tmp/x", delta_poll_idle_max_s=-1).validate()
    assert ServeConfig(store="/tmp/x", delta_poll_idle_max_s=None).validate()


def test_an_idle_searcher_lists_less_and_a_search_catches_it_up(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"r{i:04d}" for i in range(len(x))]
    store = write_store(tmp_path / "s", ids, ids, x, 1)
    rebuild_shard(store, 0)
    searcher = ShardSearcher.func_or_class(
        store.uri,
        [0],
        reload_interval_s=0.1,
        delta_poll_s=0.1,
        lease_interval_s=0,
        delta_poll_idle_max_s=1.6,
        reload_idle_max_s=1.6,
        poll_idle_after_s=0,
    )
    listings = []
    real_list = searcher.store.list_parts
    searcher.store.list_parts = lambda shard: listings.append(time.monotonic()) or real_list(shard)
    try:
        idle = searcher._idle[0]
        wait_for(lambda: idle.wait_s == 1.6, 20, "the delta poll backed off to its cap")
        wait_for(lambda: searcher._manifest_idle.wait_s == 1.6, 20, "the manifest poll too")
        start, before = time.monotonic(), len(listings)
        wait_for(lambda: time.monotonic() - start > 3.2, 10, "an idle window")
        assert len(listings) - before <= 4  # 32 at the 0.1 s interval
        # another writer's row, then a search: the poll comes back and reads it
        vector = np.ones((1, DIM), np.float32) / np.sqrt(DIM)
        write_rows(store, 0, schema.embeddings_table(["new"], ["new"], vector))

        async def search_until_found() -> float:
            await searcher.search(vector[0], 1)
            assert idle.wait_s == 0.1  # back to the interval, and polled at once
            started = time.monotonic()
            while (await searcher.search(vector[0], 1))["ids"] != ["new"]:
                assert time.monotonic() - started < 10, "the new row never showed"
                await asyncio.sleep(0.05)  # polling with a deadline
            return time.monotonic() - started

        asyncio.run(search_until_found())
    finally:
        searcher._close()
