"""THE top-k merge of per-shard results (scatter-gather and, later, base + delta of one shard).

Every shard returns its own best hits with comparable scores (exact after rerank), so the global
top-k is the k best of their union. "Best" depends on the metric: inner product is a similarity
(higher is better), squared L2 is a distance (lower is better). Ties are broken by id, so the
answer does not depend on the order the shards answered in. The same id twice (a retried shard,
or later a row in both a shard's base and its delta) is kept once, with its best score.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

from index.query.hits import Hit

METRICS = ("ip", "l2")


def sort_key(metric: str):
    """Key under which smaller means better, for ``metric``; ties broken by id."""
    if metric == "ip":
        return lambda h: (-h.score, h.id)
    if metric == "l2":
        return lambda h: (h.score, h.id)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def merge_topk(per_shard: list[list[Hit]], k: int, metric: str) -> list[Hit]:
    """The ``k`` best hits over all shards' lists, best first (a shard may give fewer than k).

    Hits with a NaN score are dropped (they are never comparable).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    key = sort_key(metric)
    best: dict[str, Hit] = {}
    for hits in per_shard:
        for hit in _valid(hits):
            seen = best.get(hit.id)
            if seen is None or key(hit) < key(seen):
                best[hit.id] = hit
    return heapq.nsmallest(k, best.values(), key=key)


def _valid(hits: Iterable[Hit]) -> Iterable[Hit]:
    return (h for h in hits if not math.isnan(h.score))
