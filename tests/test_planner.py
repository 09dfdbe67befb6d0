"""The query planner (``serve.planner``) without Ray or Serve: shard groups are plain coroutines.

Scatter and merge (the groups' lists merged into one best-first answer), a partial answer when
groups miss the deadline or fail (the shards named, reasons cut to their kind for anonymous
callers; 503 when none answers), query expansion's second scatter (with the expanded vector and
the same filter and parameters), and dedup's pool growing when near-duplicates collapse it.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from index.query.filters import parse_filter
from index.query.shaping import DEDUP_THRESHOLD, POOL_FACTOR, ShapeOptions
from serve.http.errors import ApiError
from serve.http.validate import SearchParams
from serve.planner import QueryPlanner, ShardGroup

DIM = 16
SLOW_S = 0.4  # a slow group's answer: past the 0.1 s deadlines below, well inside 10 s


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


class FakeGroup:
    """A group of shards answering exact inner-product searches over its own rows, and
    recording every call it gets."""

    def __init__(self, rows: dict[str, tuple[int, np.ndarray]], behaviour: str = "answer"):
        self.rows = rows  # id -> (shard, vector)
        self.behaviour = behaviour  # "answer", "stuck" (never answers), "fail", "slow"
        self.searches: list[dict] = []
        self.lookups: list[list[tuple[int, str]]] = []

    async def search(self, vector, k, nprobe, candidates, rerank, flt, fields, only=None) -> dict:
        self.searches.append(
            {
                "vector": np.array(vector),
                "k": k,
                "nprobe": nprobe,
                "candidates": candidates,
                "rerank": rerank,
                "filter": flt,
                "fields": fields,
                "only": only,
            }  # fmt: skip
        )
        if self.behaviour == "stuck":
            await asyncio.Event().wait()  # never set: only the planner's deadline ends it
        if self.behaviour == "slow":  # a busy replica: answers, but past the shard deadline
            await asyncio.sleep(SLOW_S)
        if self.behaviour == "fail":
            raise RuntimeError("replica died reading /srv/store/secret")
        scored = sorted(
            (
                (float(np.dot(vector, v)), row_id, shard)
                for row_id, (shard, v) in self.rows.items()
                if only is None or shard in only
            ),
            key=lambda t: (-t[0], t[1]),
        )[:k]
        return {
            "ids": [row_id for _, row_id, _ in scored],
            "uris": [f"file:///photos/{row_id}.jpg" for _, row_id, _ in scored],
            "scores": [score for score, _, _ in scored],
            "shards": [shard for _, _, shard in scored],
            "metadata": [{"name": row_id} for _, row_id, _ in scored],
        }

    async def vectors_of(self, pairs: list[tuple[int, str]]) -> list:
        self.lookups.append(list(pairs))
        return [self.rows[row_id][1] if row_id in self.rows else None for _, row_id in pairs]


def planner_of(
    groups: list[tuple[list[int], FakeGroup]],
    deadline_s: float = 5.0,
    first_answer_s: float | None = None,
):
    return QueryPlanner(
        [ShardGroup(shards, g.search, g.vectors_of) for shards, g in groups],
        "ip",
        deadline_s,
        first_answer_s=first_answer_s,
    )


def params(k: int = 5, **shape) -> SearchParams:
    return SearchParams(k, nprobe=7, rerank=True, candidates=50, shape=ShapeOptions(**shape))


def spread_rows(rng, n_shards: int, per_shard: int, first_shard: int = 0) -> dict:
    return {
        f"s{s}-{i}": (s, unit(rng.standard_normal(DIM)))
        for s in range(first_shard, first_shard + n_shards)
        for i in range(per_shard)
    }


def run(coro):
    return asyncio.run(coro)


def test_scatter_merges_every_groups_list_best_first():
    rng = np.random.default_rng(0)
    a, b = FakeGroup(spread_rows(rng, 2, 10)), FakeGroup(spread_rows(rng, 1, 10, first_shard=2))
    planner = planner_of([([0, 1], a), ([2], b)])
    query = unit(rng.standard_normal(DIM))
    answer = run(planner.search(query, params(k=6), ("name",)))

    every = {**a.rows, **b.rows}
    exact = sorted(every, key=lambda i: -float(np.dot(query, every[i][1])))[:6]
    assert [h.id for h in answer.hits] == exact  # the merge of the two lists = the exact top 6
    assert answer.missing == [] and answer.pool_missing == []
    assert {h.shard for h in answer.hits} <= {0, 1, 2}
    rows = answer.results(6)
    assert [r["id"] for r in rows] == exact and all(r["metadata"]["name"] == r["id"] for r in rows)
    assert "collapsed" not in rows[0]
    for group in (a, b):  # one call per group, with the query's parameters and fields
        (call,) = group.searches
        assert (call["k"], call["nprobe"], call["candidates"], call["fields"]) == (
            6, 7, 50, ("name",)
        )  # fmt: skip


def test_groups_that_miss_the_deadline_or_fail_are_named_and_the_rest_answer():
    rng = np.random.default_rng(1)
    good = FakeGroup(spread_rows(rng, 1, 8))
    stuck = FakeGroup(spread_rows(rng, 2, 8, first_shard=1), "stuck")
    failing = FakeGroup(spread_rows(rng, 1, 8, first_shard=3), "fail")
    planner = planner_of([([0], good), ([1, 2], stuck), ([3], failing)], deadline_s=0.2)
    query = unit(rng.standard_normal(DIM))

    answer = run(planner.search(query, params(k=3), ()))
    assert [h.shard for h in answer.hits] == [0, 0, 0]  # the answer of the group that answered
    assert answer.missing == [
        {"shard": 1, "reason": "timeout"},
        {"shard": 2, "reason": "timeout"},
        {"shard": 3, "reason": "error: RuntimeError: replica died reading /srv/store/secret"},
    ]
    anonymous = run(planner.search(query, params(k=3), (), keyed=False))
    assert anonymous.missing[2] == {"shard": 3, "reason": "error: RuntimeError"}  # no path

    nobody = planner_of([([0, 1], stuck), ([2], failing)], deadline_s=0.1)
    with pytest.raises(ApiError) as info:
        run(nobody.search(query, params(k=3), (), keyed=False))
    e = info.value
    assert (e.status, e.error) == (503, "no_shard_answered")
    assert "3 shards" in e.detail and "100 ms" in e.detail
    assert [m["shard"] for m in e.extra["missing_shards"]] == [0, 1, 2]


def test_a_search_no_shard_answered_in_time_waits_for_the_first_answer():
    """needed_shard_deadline_ms: when no group answered by the shard deadline, the first answer
    up to the longer deadline is taken (the rest left out); stragglers behind an answer in time
    are still cut at the shard deadline; without the longer deadline it is a 503."""
    rng = np.random.default_rng(2)
    slow = FakeGroup(spread_rows(rng, 1, 8), "slow")
    stuck = FakeGroup(spread_rows(rng, 1, 8, first_shard=1), "stuck")
    query = unit(rng.standard_normal(DIM))

    waited = planner_of([([0], slow), ([1], stuck)], deadline_s=0.1, first_answer_s=10.0)
    answer = run(waited.search(query, params(k=3), ()))
    assert [h.shard for h in answer.hits] == [0, 0, 0]
    assert answer.missing == [{"shard": 1, "reason": "timeout"}]

    good = FakeGroup(spread_rows(rng, 1, 8, first_shard=2))
    behind = planner_of([([2], good), ([0], slow)], deadline_s=0.1, first_answer_s=10.0)
    answer = run(behind.search(query, params(k=3), ()))
    assert answer.missing == [{"shard": 0, "reason": "timeout"}]  # not waited for

    with pytest.raises(ApiError) as info:
        run(planner_of([([0], slow), ([1], stuck)], deadline_s=0.1).search(query, params(k=3), ()))
    assert info.value.error == "no_shard_answered"


def test_expansion_scatters_again_with_the_expanded_query_and_the_same_filter():
    rng = np.random.default_rng(2)
    a, b = FakeGroup(spread_rows(rng, 1, 20)), FakeGroup(spread_rows(rng, 1, 20, first_shard=1))
    planner = planner_of([([0], a), ([1], b)])
    flt = parse_filter({"field": "category", "eq": "shoes"}, {"category": "string"})
    p = params(k=4, expand=True, expand_m=3)
    p.filter = flt
    query = unit(rng.standard_normal(DIM))
    answer = run(planner.search(query, p, ("category",)))

    for group in (a, b):
        first, second = group.searches  # the query, then the expanded query
        assert first["filter"] is flt and second["filter"] is flt
        assert (second["k"], second["nprobe"], second["candidates"], second["fields"]) == (
            first["k"], 7, 50, ("category",)
        )  # fmt: skip
        assert np.allclose(first["vector"], query)
        assert not np.allclose(second["vector"], query)  # moved towards the top results
    assert np.allclose(a.searches[1]["vector"], b.searches[1]["vector"])
    top3 = [h.id for h in answer.pool[:3]]  # their vectors were fetched from their groups
    assert sorted(i for group in (a, b) for call in group.lookups for _, i in call) == sorted(top3)
    expanded = a.searches[1]["vector"]
    every = {**a.rows, **b.rows}
    exact = sorted(every, key=lambda i: -float(np.dot(expanded, every[i][1])))[:4]
    assert [h.id for h in answer.hits] == exact  # the answer is the expanded query's


def test_dedup_grows_the_pool_while_near_duplicates_collapse_it_below_k():
    eye = np.eye(DIM, dtype=np.float32)
    dups = {f"dup-{i:02d}": (0, eye[0]) for i in range(30)}  # one photo, thirty copies
    others = {f"other-{j}": (1, eye[j]) for j in range(1, 11)}  # ten distinct ones
    a, b = FakeGroup(dups), FakeGroup(others)
    planner = planner_of([([0], a), ([1], b)])
    query = unit(eye[0] + 0.1 * eye[1:11].sum(axis=0))
    answer = run(planner.search(query, params(k=3, dedup=DEDUP_THRESHOLD), ()))

    first_k = max(3 * POOL_FACTOR, 3 + 20)  # ShapeOptions.fetch_k: every copy fills the pool
    assert [call["k"] for call in a.searches] == [first_k, first_k * POOL_FACTOR]
    rows = answer.results(3)
    assert len(rows) == 3 and rows[0]["id"].startswith("dup-")
    assert len(rows[0]["collapsed"]) == 29  # the other copies, collapsed into the first
    assert all(r["id"].startswith("other-") and r["collapsed"] == [] for r in rows[1:])
    assert [h.id for h in answer.pool][:first_k] == sorted(dups)[:first_k]  # before shaping


def test_a_routed_store_sends_a_query_only_to_the_groups_of_its_nearest_shards():
    from index.ann.routing import Router

    rng = np.random.default_rng(3)
    centres = unit(rng.standard_normal((4, DIM)))  # one cell per shard, shard s around centre s
    rows = {
        f"s{s}-{i}": (s, unit(centres[s] + 0.05 * rng.standard_normal(DIM)))
        for s in range(4)
        for i in range(6)
    }
    a = FakeGroup({i: r for i, r in rows.items() if r[0] in (0, 1)})
    b = FakeGroup({i: r for i, r in rows.items() if r[0] in (2, 3)}, behaviour="stuck")
    router = Router(centres, np.arange(4, dtype=np.int32), "ip", 4, default_probe=1)
    planner = QueryPlanner(
        [ShardGroup([0, 1], a.search, a.vectors_of), ShardGroup([2, 3], b.search, b.vectors_of)],
        "ip",
        0.3,
        router,
    )
    answer = run(planner.search(centres[1], params(k=3), ()))  # default: its nearest shard
    assert answer.visited == 1 and answer.missing == [] and not b.searches
    assert a.searches[-1]["only"] == (1,) and {h.shard for h in answer.hits} == {1}
    wider = SearchParams(3, nprobe=7, rerank=True, candidates=50, shards_probe=3)
    order = router.probe(centres[1], 3)
    answer = run(planner.search(centres[1], wider, ()))  # group b is stuck: its shards named
    assert answer.visited == 3
    assert sorted(m["shard"] for m in answer.missing) == sorted(s for s in order if s >= 2)
    assert a.searches[-1]["only"] == tuple(sorted(s for s in order if s < 2))
    too_many = SearchParams(3, nprobe=7, rerank=True, candidates=50, shards_probe=5)
    with pytest.raises(ApiError) as e:
        run(planner.search(centres[1], too_many, ()))
    assert e.value.status == 422 and e.value.error == "shards_probe_out_of_range"


def test_a_hashed_store_refuses_a_probe_below_its_shard_count():
    a = FakeGroup({})
    planner = planner_of([([0, 1], a)])
    fewer = SearchParams(3, nprobe=7, rerank=True, candidates=50, shards_probe=1)
    with pytest.raises(ApiError) as e:
        run(planner.search(unit(np.ones(DIM)), fewer, ()))
    assert e.value.status == 422 and e.value.error == "shards_probe_unsupported"
    every = SearchParams(3, nprobe=7, rerank=True, candidates=50, shards_probe=2)
    assert run(planner.search(unit(np.ones(DIM)), every, ())).visited == 2
    assert a.searches[-1]["only"] is None  # a group searches all its shards
