"""Shard groups without a cluster: one searcher replica over several shards, batching requests.

The deployment's class is driven directly in an event loop (``@serve.batch`` needs no Serve
controller), over a real store of real FAISS versions: concurrent queries are searched as one
batch and each gets exactly what a lone query gets, which is the merged top-k of its shards.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from harness.stores import write_store
from index.ann.shard_index import ShardIndex
from index.live.rebuild import rebuild_shard
from index.query.merge import merge_topk
from serve.app import shard_groups
from serve.deployments.searcher import ShardSearcher

DIM = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"r{i:05d}" for i in range(len(x))]
    store = write_store(tmp_path_factory.mktemp("groups") / "s", ids, ids, x, 3)
    for shard in range(3):
        rebuild_shard(store, shard)
    return store, x


def test_shard_groups_split_consecutive_shards():
    assert shard_groups(4, None) == [[0, 1, 2, 3]]
    assert shard_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert shard_groups(3, 1) == [[0], [1], [2]]


def test_group_searches_its_shards_in_one_call_and_batches_concurrent_queries(store):
    store, x = store
    cls = ShardSearcher.func_or_class
    queries = x[:24] + 0.05

    async def run():
        searcher = cls(store.uri, [0, 1, 2], reload_interval_s=0, delta_poll_s=0, batch_wait_s=0.02)
        try:
            lone = [await searcher.search(q, 10) for q in queries[:4]]
            together = await asyncio.gather(
                *(searcher.search(q, 5 + i % 6) for i, q in enumerate(queries))
            )
            return searcher, lone, together
        finally:
            searcher._stop.set()

    searcher, lone, together = asyncio.run(run())
    assert all(answer["batch"] == 1 for answer in lone)
    assert max(answer["batch"] for answer in together) > 1  # searched as one FAISS batch
    shards = [ShardIndex.load(store, s) for s in range(3)]
    for i, answer in enumerate(together):
        k = 5 + i % 6
        expected = merge_topk([s.search(queries[i], k)[0] for s in shards], k, "ip")
        assert answer["ids"] == [h.id for h in expected]  # split back per request, its own k
        assert answer["shards"] == [h.shard for h in expected]
        assert answer["answered"] == [0, 1, 2]
    for i, answer in enumerate(lone):  # alone (k=10) or in a batch: the same ranking
        assert answer["ids"][: 5 + i % 6] == together[i]["ids"]
    assert [row["shard"] for row in searcher.stats()] == [0, 1, 2]


def test_batcher_starts_a_lone_query_at_once_and_fails_only_the_bad_request_of_a_batch():
    from serve.deployments.batching import QueryBatcher

    calls: list[list[int]] = []

    def run(items):
        calls.append(list(items))
        if -1 in items:
            raise RuntimeError("boom")
        return [i * 2 for i in items]

    async def go():
        batcher = QueryBatcher(run, max_batch=4)
        assert await batcher.submit(3) == 6 and calls == [[3]]  # alone: its own batch, no wait
        results = await asyncio.gather(*(batcher.submit(i) for i in range(9)))
        assert results == [i * 2 for i in range(9)]
        assert max(len(c) for c in calls) == 4  # later arrivals went together, max_batch each
        failed = await asyncio.gather(*(batcher.submit(i) for i in (-1, 5)), return_exceptions=True)
        return failed

    failed = asyncio.run(go())
    assert isinstance(failed[0], RuntimeError) and failed[1] == 10  # same batch: only -1 fails
