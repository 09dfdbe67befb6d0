"""One search over a group of live shards: each shard proposes, the group ranks once, reads once.

A searcher replica serves a group of shards (``serve.deployments.searcher``). Searching each
shard on its own (``LiveShard.search``: rerank, rank, read the ids and URIs of its top hits, make
hit objects, merge base and delta) and then merging the shards costs, per (query, shard), about
250 us of Python against 60 us of FAISS (16 shards of 62k rows, 1M x 256, one query): a group of
16 shards answered at a third of one shard's rate. Here a shard only *proposes*: its compressed
index's candidates with exact scores (``ShardIndex.scored_candidates``) and its delta's hits
(exact already, ``index.live.snapshot.search_delta``). The group then ranks every candidate of a
query at once and reads only the rows of the answer, from the shards that hold them. In a hash
store every shard searched every query of the batch, so the proposals rank side by side as one
array; in a routed one a query ranks only the proposals of the shards it visited (an array over
every proposal, padded for the shards a query did not visit, cost a routed batch as much as its
searches: 16 queries visiting 2 of 64 shards, 2.0 against 1.2 ms a query).

The answer is the per-shard one's, or better: exact scores ranked best first, ties by id (every
candidate tied with the k-th is read, and ``index.query.merge.merge_topk`` orders them and keeps
an id once). A shard proposes every candidate it reranked rather than its own top ``share``
(``index.query.share``), so a query whose top k crowd into one shard of a hash store loses none
of them; the share bounds only what a shard answers without rerank.

Filtered searches (their plan is per shard, ``ShardIndex.search_filtered``) and stores with
region rows (hits become images before the merge, ``index.query.region_hits``) are searched
shard by shard and merged (``search_each``), as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from index.ann.queries import check_queries
from index.ann.transform import in_store_space
from index.live.delta import LiveShard
from index.live.snapshot import search_delta
from index.query.filters import Filter
from index.query.hits import Hit
from index.query.merge import merge_topk
from index.query.region_hits import fetch_rows, to_images

# observe(shard, ms per query, rows fetched from its compressed index): the searcher's metrics
Observe = Callable[[int, float, int], None]
MapShards = Callable[[Callable, Sequence], Iterable]


@dataclass(frozen=True)
class GroupQuery:
    """What one batch asks of the group: the same parameters for every query of it."""

    k: int
    share: int  # of the top k, what each shard is asked for (index.query.share; k: all)
    nprobe: int | None = None
    candidates: int | None = None
    rerank: bool = True
    filter: Filter | None = None
    fields: tuple[str, ...] = ()
    per_image: int = 1  # rows per image (index.rows.regions)
    # shards each query of a hash store visits (all of them): without ``nprobe``, a shard
    # probes its share of the tuning's floor (ShardIndex.nprobe_visiting); 1: its own default
    visits: int = 1


@dataclass
class GroupAnswer:
    hits: list[list[Hit]]  # per query, best first, up to k
    answered: list[list[int]]  # per query, the shards that searched it
    plans: dict[int, dict] = field(default_factory=dict)  # shard -> its filter plan


@dataclass
class _Proposal:
    shard: int
    who: list[int]  # the batch's queries this shard searched
    base: object  # the snapshot's ShardIndex, or None
    scores: np.ndarray  # (len(who), f): exact with rerank
    keys: np.ndarray  # (len(who), f) row keys, -1 = none
    delta: list[list[Hit]]  # per query of ``who``


def search_group(
    asked: Sequence[tuple[LiveShard | None, int, list[int]]],
    queries: np.ndarray,
    ask: GroupQuery,
    metric: str,
    map_shards: MapShards = map,
    observe: Observe | None = None,
    parallel: int = 1,
) -> GroupAnswer:
    """``asked``: per shard of the group, (its view or None when not loaded, the shard, the
    rows of ``queries`` that visit it). The shards are searched in ``parallel`` runs of
    consecutive shards through ``map_shards`` (a thread pool's ``map`` of that many threads:
    FAISS and numpy release the GIL), or one after another in this thread (``parallel`` 1)."""
    if ask.filter is not None or ask.per_image > 1:
        return search_each(asked, queries, ask, metric, map_shards, observe, parallel)
    n = len(queries)
    spaces: dict[int, np.ndarray] = {}  # one check and reduction per store transform

    def propose(item) -> _Proposal | None:
        view, shard, who = item
        if view is None:
            return None
        start, snap = time.perf_counter(), view.snapshot()
        q = _in_space(view, queries, spaces)
        q = q if len(who) == n else q[who]
        scores, keys = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if snap.base is not None:
            nprobe = snap.base.nprobe_visiting(ask.visits) if ask.nprobe is None else ask.nprobe
            scores, keys = snap.base.scored_candidates(
                q, ask.share, nprobe=nprobe, candidates=ask.candidates, rerank=ask.rerank,
                exclude=snap.exclude,
            )  # fmt: skip
        delta = search_delta(snap, q, ask.k, metric, shard, None, ask.fields)
        if observe is not None:
            ms = (time.perf_counter() - start) * 1000
            observe(shard, ms / max(1, len(who)), keys.shape[1])
        return _Proposal(shard, who, snap.base, scores, keys, delta)

    proposals = [p for p in _map(map_shards, propose, asked, parallel) if p is not None]
    answered: list[list[int]] = [[] for _ in range(n)]
    for p in proposals:
        for q in p.who:
            answered[q].append(p.shard)
    return GroupAnswer(_rank(proposals, n, ask.k, metric, ask.fields), answered)


def _rank(proposals: list[_Proposal], n: int, k: int, metric: str, fields) -> list[list[Hit]]:
    """Per query, the ``k`` best of every proposal: the base candidates that visited it ranked
    at once, the rows of the best (and their ties) read, merged with the deltas' hits."""
    found: list[list[Hit]] = [[] for _ in range(n)]
    for p in proposals:  # delta hits: exact scores, few (a delta's top k)
        for row, q in enumerate(p.who):
            found[q].extend(p.delta[row])
    every = all(len(p.who) == n for p in proposals)  # a hash store: all shards, all queries
    chosen = (
        _choose_dense(proposals, n, k, metric) if every else _choose_each(proposals, n, k, metric)
    )
    _read(proposals, chosen, fields, found)
    out = [merge_topk([hits], k, metric) for hits in found]
    for q in range(n):  # an id proposed twice (rare: a row moving shards) left fewer than k
        if len(out[q]) < k:
            every_cell = _choose_each(proposals, n, None, metric, only=q)
            if _cells_of(proposals, every_cell, q) > _cells_of(proposals, chosen, q):
                rest: list[list[Hit]] = [[] for _ in range(n)]
                _read(proposals, every_cell, fields, rest)
                out[q] = merge_topk([out[q], rest[q]], k, metric)
    return out


def _cells_of(proposals: list[_Proposal], chosen: Chosen, q: int) -> int:
    """How many of the ``chosen`` cells are query ``q``'s."""
    return sum(
        int((np.asarray(proposals[i].who)[rows] == q).sum()) for i, (rows, _) in chosen.items()
    )


# the chosen cells: per proposal index, (rows of its ``who``, columns of its candidates)
Chosen = dict[int, tuple[np.ndarray, np.ndarray]]


def _primary(scores: np.ndarray, keys: np.ndarray, metric: str) -> np.ndarray:
    """Smaller is better; missing candidates (-1 keys, NaN scores) are +inf."""
    primary = np.where(keys >= 0, -scores if metric == "ip" else scores, np.inf)
    primary[np.isnan(primary)] = np.inf
    return primary


def _best_cells(primary: np.ndarray, k: int | None) -> np.ndarray:
    """Which cells of each row are among its ``k`` best, the k-th's ties included (every
    finite one with ``k`` None)."""
    finite = np.isfinite(primary)
    if k is None or not primary.shape[-1]:
        return finite
    take = min(k, primary.shape[-1])
    kth = np.partition(primary, take - 1, axis=-1)[..., take - 1 : take]
    return (primary <= kth) & finite


def _choose_dense(proposals: list[_Proposal], n: int, k: int, metric: str) -> Chosen:
    """A hash store's batch, where every proposal covers every query in order: the proposals
    side by side as one (n, total candidates) array, ranked row by row at once."""
    widths = [p.keys.shape[1] for p in proposals]
    if not sum(widths):
        return {}
    scores = np.concatenate([p.scores for p in proposals], axis=1)
    keys = np.concatenate([p.keys for p in proposals], axis=1)
    rows, cols = np.nonzero(_best_cells(_primary(scores, keys, metric), k))
    starts = np.cumsum([0, *widths])
    owner = np.searchsorted(starts, cols, side="right") - 1
    chosen: Chosen = {}
    for i in np.unique(owner).tolist():
        mine = owner == i
        chosen[i] = (rows[mine], cols[mine] - starts[i])
    return chosen


def _choose_each(
    proposals: list[_Proposal], n: int, k: int | None, metric: str, only: int | None = None
) -> Chosen:
    """A routed store's batch, where each query visited a few of the group's shards: each
    query ranks only the candidates of the proposals that searched it (no (n, total) array
    padded for the shards it did not visit: 16 queries over 25 of 64 shards made one of
    640,000 cells for 51,200 candidates). ``only``: that query alone."""
    visits: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # query -> (proposal, row)
    for i, p in enumerate(proposals):
        if p.keys.shape[1]:
            for row, q in enumerate(p.who):
                visits[q].append((i, row))
    picked: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    for q in range(n) if only is None else (only,):
        if not visits[q]:
            continue
        primary = np.concatenate(
            [
                _primary(proposals[i].scores[row], proposals[i].keys[row], metric)
                for i, row in visits[q]
            ]
        )
        best = _best_cells(primary, k)
        pos = 0
        for i, row in visits[q]:
            width = proposals[i].keys.shape[1]
            cols = np.flatnonzero(best[pos : pos + width])
            pos += width
            if len(cols):
                rows, colls = picked.setdefault(i, ([], []))
                rows.extend([row] * len(cols))
                colls.append(cols)
    return {
        i: (np.asarray(rows, np.int64), np.concatenate(colls))
        for i, (rows, colls) in picked.items()
    }


def _read(proposals: list[_Proposal], chosen: Chosen, fields, found) -> None:
    """The hits of the ``chosen`` cells, appended to ``found[query]``: one row table read per
    shard that holds any of them."""
    for i, (rows, cols) in chosen.items():
        p = proposals[i]
        keys, scores = p.keys[rows, cols], p.scores[rows, cols]
        hits = p.base.hits_at(keys, scores.tolist(), fields or None)
        for row, hit in zip(rows.tolist(), hits, strict=True):
            found[p.who[row]].append(hit)


def search_each(
    asked: Sequence[tuple[LiveShard | None, int, list[int]]],
    queries: np.ndarray,
    ask: GroupQuery,
    metric: str,
    map_shards: MapShards = map,
    observe: Observe | None = None,
    parallel: int = 1,
) -> GroupAnswer:
    """Each shard searched on its own (``LiveShard.search_with_plan``: a filter's plan, region
    rows renamed to images) and the shards' hits merged per query."""
    n = len(queries)
    share = fetch_rows(ask.share, ask.per_image)

    def one(item):
        view, shard, who = item
        if view is None:
            return shard, who, None, None
        start = time.perf_counter()
        hits, plan = view.search_with_plan(
            queries if len(who) == n else queries[who],
            share,
            nprobe=ask.nprobe,
            candidates=ask.candidates,
            rerank=ask.rerank,
            filter=ask.filter,
            fields=ask.fields,
        )
        if observe is not None:
            ms = (time.perf_counter() - start) * 1000
            fetched = view.fetch_size(share, ask.candidates, ask.rerank)
            observe(shard, ms / max(1, len(who)), fetched)
        if ask.per_image > 1:  # region rows -> their images (merged below: best cell wins)
            hits = [to_images(h) for h in hits]
        return shard, who, hits, None if plan is None else plan.to_dict()

    results = _map(map_shards, one, asked, parallel)
    per_query: list[list[list[Hit]]] = [[] for _ in range(n)]
    answered: list[list[int]] = [[] for _ in range(n)]
    for shard, who, hits, _ in results:
        if hits is None:
            continue
        for row, q in enumerate(who):
            per_query[q].append(hits[row])
            answered[q].append(shard)
    merged = [merge_topk(per_query[q], ask.k, metric) for q in range(n)]
    plans = {shard: plan for shard, _, _, plan in results if plan is not None}
    return GroupAnswer(merged, answered, plans)


def _in_space(view: LiveShard, queries: np.ndarray, spaces: dict) -> np.ndarray:
    """The batch checked and in ``view``'s space (the store's transform), once per transform."""
    key = id(view.transform)
    if key not in spaces:
        spaces[key] = check_queries(in_store_space(queries, view.transform), view.dim)
    return spaces[key]


def _map(map_shards: MapShards, fn, items: Sequence, parallel: int) -> list:
    """``fn`` of every item, in order: in ``parallel`` runs of consecutive items handed to
    ``map_shards``, or here when one run does it all. One task per run, not per shard: a task
    per shard cost a query 4.7 ms against 3.8 over 16 shards of 1M x 256 in a pool of 2."""
    if parallel <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    size = -(-len(items) // parallel)
    runs = [items[i : i + size] for i in range(0, len(items), size)]
    return [out for run in map_shards(lambda run: [fn(item) for item in run], runs) for out in run]
