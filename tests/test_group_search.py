"""A group of live shards searched as one (``index.live.group_search``) answers what searching
each shard on its own and merging answers, over real FAISS versions with deltas and deletes.

The reference is ``LiveShard.search`` per shard for all ``k`` (its own rerank and base + delta
merge) merged by ``merge_topk``; the group path ranks every shard's reranked candidates at once
and reads only the answer's rows, so the two must agree on ids, order, scores and shards, for
hash and routed visits, without rerank, with ties at the cut and with one id in two shards.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from harness.stores import write_store
from index.live.delta import load_live_shard
from index.live.group_search import GroupQuery, search_each, search_group
from index.live.rebuild import rebuild_shard
from index.query.merge import merge_topk
from index.storage.manifest import load_manifest

DIM = 32
SHARDS = 3


@pytest.fixture(scope="module", params=["ip", "l2"])
def views(request, tmp_path_factory):
    metric = request.param
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3600, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[-5:] = x[-6]  # six rows, one vector: exact ties, spread over the shards by their ids
    ids = [f"r{i:05d}" for i in range(len(x))]
    store = write_store(
        tmp_path_factory.mktemp(f"group-{metric}") / "s", ids, ids, x, SHARDS, metric
    )
    for shard in range(SHARDS):
        rebuild_shard(store, shard)
    manifest = load_manifest(store)
    out = [load_live_shard(store, s, manifest.shards[s].dir, DIM, metric) for s in range(SHARDS)]
    assert all(v.base is not None and v.base.nlist > 0 for v in out)  # IVF+PQ: reranked
    # a delta on every shard, and deletes of base rows (hidden inside FAISS) and delta rows
    later = int(time.time() * 1000) + 60_000
    for s, view in enumerate(out):
        new = rng.standard_normal((40, DIM)).astype(np.float32)
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        new_ids = [f"d{s}-{i:03d}" for i in range(40)]
        view.add_rows(f"part-new-{s}", new_ids, new_ids, new, [later] * 40)
        base_ids = [h.id for h in view.search(x[:5], 3)[0]]  # a query's best base rows
        view.add_tombstones(f"tomb-{s}", [*base_ids[:2], new_ids[0]], [later + 1] * 3)
    return out, x, metric


def reference(views, queries, k, visits=None, **options):
    """Each shard's own top k, merged: the per-shard path with every shard asked for all k."""
    out = []
    for i, q in enumerate(queries):
        asked = [v for s, v in enumerate(views) if visits is None or s in visits[i]]
        out.append(
            merge_topk([v.search(q[None], k, **options)[0] for v in asked], k, views[0].metric)
        )
    return out


def asked_of(views, n, visits=None):
    return [
        (v, s, [q for q in range(n) if visits is None or s in visits[q]])
        for s, v in enumerate(views)
    ]


def same(got, expected):
    assert [[h.id for h in hits] for hits in got] == [[h.id for h in hits] for hits in expected]
    assert [[h.shard for h in hits] for hits in got] == [[h.shard for h in e] for e in expected]
    for g, e in zip(got, expected, strict=True):
        # a base row's score is the same in any batch (index.ann.rerank); the delta's exact
        # scan is BLAS, whose last bit may depend on the batch
        np.testing.assert_allclose([h.score for h in g], [h.score for h in e], rtol=1e-6)


@pytest.mark.parametrize("k", [1, 10, 37])
def test_a_group_answers_the_merge_of_its_shards(views, k):
    views, x, metric = views
    queries = x[:40] + 0.1 * np.random.default_rng(k).standard_normal((40, DIM)).astype(np.float32)
    queries[:3] = x[:3]  # base rows hidden by a tombstone must not come back
    answer = search_group(asked_of(views, 40), queries, GroupQuery(k=k, share=k), metric)
    same(answer.hits, reference(views, queries, k))
    assert answer.answered == [list(range(SHARDS))] * 40
    hidden = {h.id for v in views for h in v.search(x[:5], 3)[0]}
    assert not hidden & {h.id for hits in answer.hits for h in hits} - hidden


def test_routed_visits_search_only_the_shards_each_query_visits(views):
    views, x, metric = views
    queries = x[100:112] + 0.05
    visits = [{0}, {1, 2}, {2}, {0, 1, 2}] * 3
    asked = asked_of(views, len(queries), visits)
    answer = search_group(asked, queries, GroupQuery(k=10, share=10), metric)
    same(answer.hits, reference(views, queries, 10, visits))
    assert answer.answered == [sorted(v) for v in visits]


def test_without_rerank_the_index_scores_are_merged_as_they_are(views):
    views, x, metric = views
    queries = x[200:220] + 0.05
    ask = GroupQuery(k=10, share=10, rerank=False, nprobe=4)
    answer = search_group(asked_of(views, 20), queries, ask, metric)
    same(answer.hits, reference(views, queries, 10, rerank=False, nprobe=4))


def test_ties_at_the_cut_are_broken_by_id(views):
    views, x, metric = views
    copies = [f"r{i:05d}" for i in range(len(x) - 6, len(x))]
    holding = {s for s, v in enumerate(views) for c in copies if v.base.row_key(c) is not None}
    assert len(holding) > 1  # the cut falls between shards
    for k in (1, 2, 3, 6, 10):
        answer = search_group(asked_of(views, 1), x[-1:], GroupQuery(k=k, share=k), metric)
        same(answer.hits, reference(views, x[-1:], k))
        ids = [h.id for h in answer.hits[0]]
        assert ids[: min(k, 6)] == copies[: min(k, 6)]  # tied exactly: by id


def test_one_id_in_two_shards_is_answered_once_and_k_are_still_answered(views):
    views, x, metric = views
    later = int(time.time() * 1000) + 120_000
    twin = views[0].base.id_of(7)  # a row of shard 0, now in shard 1 too (as in a move)
    vector = views[0].vector_of(twin)
    views[1].add_rows("part-twin", [twin], ["moved"], vector[None], [later])
    query = vector + 0.01
    for k in (1, 2, 5, 10):
        answer = search_group(asked_of(views, 1), query[None], GroupQuery(k=k, share=k), metric)
        ids = [h.id for h in answer.hits[0]]
        assert len(ids) == len(set(ids)) == k and twin in ids
        assert ids == [h.id for h in reference(views, query[None], k)[0]]


def test_filtered_and_region_searches_go_shard_by_shard(views):
    views, x, metric = views
    ask = GroupQuery(k=5, share=5)
    per_shard = search_each(asked_of(views, 4), x[:4], ask, metric)
    same(per_shard.hits, search_group(asked_of(views, 4), x[:4], ask, metric).hits)


def test_an_id_proposed_by_two_bases_is_read_once_and_the_next_candidate_fills_its_place():
    """Two shards' bases both hold ``a`` (a row mid-move): the ranking reads past the cut."""
    from index.live.group_search import _Proposal, _rank
    from index.query.hits import Hit

    class Base:  # a version's row table: row key -> id
        def __init__(self, shard, ids):
            self.shard, self.ids = shard, ids

        def hits_at(self, keys, scores, fields=None):
            return [Hit(self.ids[k], "u", s, self.shard) for k, s in zip(keys, scores, strict=True)]

    def proposal(shard, ids, scores, who=(0,)):
        keys = np.tile(np.arange(len(ids), dtype=np.int64), (len(who), 1))
        scores = np.tile(np.asarray(scores, np.float32), (len(who), 1))
        return _Proposal(shard, list(who), Base(shard, ids), scores, keys, [[]] * len(who))

    proposals = [proposal(0, ["a", "b", "c"], [0.9, 0.5, 0.1]), proposal(1, ["a", "d"], [0.9, 0.4])]
    for k, expected in [(1, ["a"]), (2, ["a", "b"]), (3, ["a", "b", "d"]), (9, list("abdc"))]:
        assert [h.id for h in _rank(proposals, 1, k, "ip", ())[0]] == expected
    # the same in a routed batch (each query ranks the proposals that searched it): query 1
    # was searched by both shards, query 0 by shard 1 alone
    routed = [
        proposal(0, ["a", "b", "c"], [0.9, 0.5, 0.1], who=(1,)),
        proposal(1, ["a", "d"], [0.9, 0.4], who=(0, 1)),
    ]
    for k, expected in [(1, ["a"]), (2, ["a", "b"]), (3, ["a", "b", "d"]), (9, list("abdc"))]:
        hits = _rank(routed, 2, k, "ip", ())
        assert [h.id for h in hits[1]] == expected
        assert [h.id for h in hits[0]] == ["a", "d"][:k]


@pytest.mark.parametrize("parallel", [2, 3, 5])
def test_runs_of_shards_in_a_pool_answer_as_one_thread_does(views, parallel):
    from concurrent.futures import ThreadPoolExecutor

    views, x, metric = views
    queries = x[500:508] + 0.05
    alone = search_group(asked_of(views, 8), queries, GroupQuery(k=10, share=10), metric)
    observed: list[int] = []
    with ThreadPoolExecutor(parallel) as pool:
        pooled = search_group(
            asked_of(views, 8),
            queries,
            GroupQuery(k=10, share=10),
            metric,
            pool.map,
            lambda shard, ms, rows: observed.append(shard),
            parallel,
        )
    same(pooled.hits, alone.hits)
    assert pooled.answered == alone.answered and sorted(observed) == list(range(SHARDS))


def test_a_hash_group_probes_each_shard_at_its_share_of_the_floor(tmp_path):
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((40, DIM)).astype(np.float32)
    x = centers[rng.integers(0, 40, 6000)] + 0.1 * rng.standard_normal((6000, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"c{i:05d}" for i in range(len(x))]
    store = write_store(tmp_path / "s", ids, ids, x, SHARDS, "ip")
    for shard in range(SHARDS):
        rebuild_shard(store, shard)
    manifest = load_manifest(store)
    views = [load_live_shard(store, s, manifest.shards[s].dir, DIM, "ip") for s in range(SHARDS)]
    base = views[0].base
    lowered = base.nprobe_visiting(SHARDS)  # clusters: tuned to fewer lists than the floor
    assert lowered < base.default_nprobe and lowered == views[1].base.nprobe_visiting(SHARDS)
    # without rerank the index's own ranking shows which lists were probed
    queries = x[:40] + 0.3 * rng.standard_normal((40, DIM)).astype(np.float32)
    visiting = GroupQuery(k=10, share=10, rerank=False, visits=SHARDS)
    got = search_group(asked_of(views, 40), queries, visiting, "ip").hits
    at_lowered = GroupQuery(k=10, share=10, rerank=False, nprobe=lowered)
    same(got, search_group(asked_of(views, 40), queries, at_lowered, "ip").hits)
    at_default = GroupQuery(k=10, share=10, rerank=False)  # visits=1: each shard's floor
    alone = search_group(asked_of(views, 40), queries, at_default, "ip").hits
    assert [[h.id for h in hs] for hs in got] != [[h.id for h in hs] for hs in alone]
