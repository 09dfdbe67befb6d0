"""One request fails alone (REVIEW-9d94e46 1.10): requests batched together come from different
callers, so a bad one must fail with its own error while the others get their answers.

Driven directly (no Serve): the ``QueryBatcher`` with a batch function that raises for one item,
and the searcher deployment's class over a real l2 store, given the review's example: the
expanded query of large valid vectors overflows float32 to inf (``expanded_query`` with l2 is a
plain mean) and is searched in the same batch as a good query.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from harness.stores import write_store
from index.live.rebuild import rebuild_shard
from index.query.shaping import expanded_query
from serve.deployments.batching import QueryBatcher
from serve.deployments.searcher import ShardSearcher

DIM = 16


def test_a_bad_request_fails_alone_when_the_batch_function_raises():
    calls: list[list[int]] = []

    def run(items):
        calls.append(list(items))
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in {items}")
        return [i * 10 for i in items]

    async def go():
        batcher = QueryBatcher(run, max_batch=8)
        return await asyncio.gather(
            *(batcher.submit(i) for i in (1, -7, 2, 3)), return_exceptions=True
        )

    one, bad, two, three = asyncio.run(go())
    assert (one, two, three) == (10, 20, 30)  # the good ones get their answers
    assert isinstance(bad, ValueError) and "[-7]" in str(bad)  # the bad one its own error
    assert [1, -7, 2, 3] in calls  # they really were one batch


def test_a_batch_function_can_fail_one_slot():
    from serve.deployments.batching import Failed

    def run(items):
        return [Failed(KeyError(i)) if i == "bad" else i.upper() for i in items]

    async def go():
        batcher = QueryBatcher(run, max_batch=8)
        return await asyncio.gather(
            *(batcher.submit(i) for i in ("a", "bad", "b")), return_exceptions=True
        )

    a, bad, b = asyncio.run(go())
    assert (a, b) == ("A", "B") and isinstance(bad, KeyError)


@pytest.fixture(scope="module")
def l2_store(tmp_path_factory):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((800, DIM)).astype(np.float32)
    ids = [f"r{i:04d}" for i in range(len(x))]
    store = write_store(tmp_path_factory.mktemp("l2") / "s", ids, ids, x, 2, "l2")
    for shard in (0, 1):
        rebuild_shard(store, shard)
    return store, x


def test_an_overflowed_expanded_query_fails_only_its_own_request(l2_store):
    store, x = l2_store
    big = np.full(DIM, 3e38, np.float32)  # finite, valid float32 vectors
    bad = expanded_query(big, np.stack([big, big]), [0.0, 0.0], metric="l2")
    assert not np.isfinite(bad).all()  # the mean's sum overflowed
    good = x[5] + 0.01

    async def go():
        searcher = ShardSearcher.func_or_class(
            store.uri, [0, 1], reload_interval_s=0, delta_poll_s=0, lease_interval_s=0
        )
        try:
            answers = await asyncio.gather(
                searcher.search(good, 5), searcher.search(bad, 5), return_exceptions=True
            )
            return answers, searcher.batcher
        finally:
            searcher._stop.set()

    (answer, error), batcher = asyncio.run(go())
    assert isinstance(error, ValueError), error
    assert not isinstance(answer, BaseException), answer
    assert answer["ids"][0] == "r0005" and answer["answered"] == [0, 1]
    assert answer["batch"] == 1  # searched again on its own after the shared call failed
    assert batcher.batches == 1 and batcher.items == 2  # the two arrived as one batch


def test_a_small_k_never_batches_with_a_huge_one():
    """A sub-batch runs at its largest k (review 2.3: co-batched callers paid for k=1000):
    requests batch only with the same parameters and a k of the same power-of-4 band."""
    from serve.deployments.batching import k_band, sub_batches

    assert [k_band(k) for k in (1, 2, 4, 5, 16, 17, 64, 65, 1000)] == [0, 1, 1, 2, 2, 3, 3, 4, 5]
    keys = [(10, "p"), (1000, "p"), (12, "p"), (10, "filtered"), (900, "p"), (16, "p")]
    assert sub_batches(keys) == [[0, 2, 5], [1, 4], [3]]
