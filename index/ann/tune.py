"""Measure a freshly built shard index and pick its default ``nprobe`` and rerank ``candidates``.

The policy's rules fix the index's shape from sizes alone; how many lists to probe and how many
compressed-index candidates to rescore for a given recall depends on the data (on well-separated
clusters one list is enough, on real embeddings far more; when many neighbours are nearly
equidistant the PQ ranking needs hundreds of candidates before rerank finds the true top 10).
So every build measures it, autofaiss-style:

- ``queries`` rows of the shard, drawn at random, serve as queries; their exact top-k
  (float32, leaving the query row itself out) is the ground truth;
- for nprobe in 1, 2, 4, ... up to ``4 x`` the policy's nprobe (at most nlist; stopping early
  once doubling nprobe gains < 0.002 recall at every candidate count) and each number
  of candidates in ``CANDIDATE_LADDER`` up to n/8 (rescoring more is no longer a shortcut over
  a flat scan), recall@k after exact rerank with the stored float16
  vectors (as served);
- the defaults are the fewest candidates that reach ``target`` at some measured nprobe, then
  the smallest such nprobe, raised to at least ``NPROBE_MIN`` (8) lists: probing a few more
  lists of 4-bit codes is cheap insurance for queries less like the catalogue than its own rows
  (on well-separated data one list measures enough). What the sample needs is kept as
  ``saturated_nprobe``: the fewest lists past which probing more gains < ``SATURATED`` recall
  at the chosen candidates (not merely the first to reach the target: 64 hash shards of 2M x
  256 reached 0.98 at 1 list, 0.9865, but 4 lists found 0.9975, and held-out queries lost
  0.009 recall@10 at 1). A query visiting many hash shards shares the floor among them down
  to that (``index.ann.policy.visit_nprobe``). If nothing reaches the target, the best
  measured pair, and the reason says so.

Per-shard recall@k is a conservative proxy for the merged answer: a shard that finds its own true
top-k also finds its share of the global top-k.
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from index.ann.exact import exact_search
from index.ann.policy import NPROBE_MIN, IndexSpec
from index.ann.rerank import best_k, exact_scores

TARGET_RECALL = 0.98
TUNE_QUERIES = 200
# up to 6400: a shard of a routed store (index.ann.routing) holds a few dense clusters, where the
# 4-bit codes rank a query's true top 10 among thousands of near ties (10M x 256-d mixture, 16
# routed shards: 1600 candidates gave recall@10 0.89, 3200 0.95, 6400 0.99). Steps of 1.5x and
# 2x in turn, not doubling: the rerank is most of a shard's search, and a doubling ladder made a
# shard that needs 70 rescore 100 (1M x 256 in 16 hash shards, group search of 1,000 held-out
# queries: 75 a shard recall@10 0.9933 at 0.66 ms a query, 100 0.9935 at 0.74-0.78; 1 shard:
# 600 0.9836 at 0.32-0.34 ms, 800 0.9920 at 0.41-0.44). Each step is a prefix of one scoring,
# so the finer ladder costs the tuning almost nothing.
CANDIDATE_LADDER = (50, 75, 100, 150, 200, 300, 400, 600, 800, 1200, 1600, 2400, 3200, 4800, 6400)
SATURATED = 0.002  # stop raising nprobe once no candidate count gains more recall than this
MIN_ROWS = 1000  # below this the policy's defaults stand (the sample would be most of the shard)


def tune_defaults(
    index: faiss.Index,
    vectors: np.ndarray,
    vectors16: np.ndarray,
    metric: str,
    spec: IndexSpec,
    *,
    k: int = 10,
    target: float = TARGET_RECALL,
    queries: int = TUNE_QUERIES,
    seed: int = 0,
) -> dict | None:
    """Measured defaults for an IVF index: {nprobe, candidates, recall, reason, table, seconds}.

    None for a flat index or a shard too small to sample (the policy's defaults then apply).
    """
    n = len(vectors)
    ivf = find_ivf(index)
    if ivf is None or n < MIN_ROWS:
        return None
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(n, size=min(queries, n // 4), replace=False))
    q = np.ascontiguousarray(vectors[rows])
    _, exact = exact_search(q, vectors, k + 1, metric)
    truth = [set(_drop_self(r, row)[:k].tolist()) for r, row in zip(exact, rows, strict=True)]

    ladder = [c for c in CANDIDATE_LADDER if c <= n // 8] or [max(1, n // 8)]
    top = ladder[-1]
    nprobes = _powers_of_two(min(ivf.nlist, 4 * max(1, spec.nprobe)))
    table: list[dict] = []
    for nprobe in nprobes:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if isinstance(index, faiss.IndexPreTransform):
            params = faiss.SearchParametersPreTransform(index_params=params)
        _, found = index.search(q, top + 1, params=params)
        found = np.stack([_drop_self(r, row)[:top] for r, row in zip(found, rows, strict=True)])
        scores = exact_scores(vectors16, metric, q, found)  # once; each ladder step is a prefix
        measured = []
        for c in ladder:
            _, keys = best_k(scores[:, :c], found[:, :c], metric, k)
            hits = sum(len(truth[i] & set(keys[i].tolist())) for i in range(len(rows)))
            measured.append({"nprobe": nprobe, "candidates": c, "recall": hits / (k * len(rows))})
        before = table[-len(measured) :] or [{"recall": -1.0}] * len(measured)
        gain = max(m["recall"] - b["recall"] for m, b in zip(measured, before, strict=True))
        table.extend(measured)
        if gain < SATURATED:  # probing more lists no longer finds more neighbours
            break

    reached = [t for t in table if t["recall"] >= target]
    if reached:
        candidates = min(t["candidates"] for t in reached)
        nprobe = min(t["nprobe"] for t in reached if t["candidates"] == candidates)
        reason = f"reaches recall@{k} >= {target}"
    else:
        best = max(table, key=lambda t: (t["recall"], -t["candidates"], -t["nprobe"]))
        candidates, nprobe = best["candidates"], best["nprobe"]
        reason = f"target recall@{k} {target} not reached on this data; best measured pair"
    recall = next(
        t["recall"] for t in table if t["nprobe"] == nprobe and t["candidates"] == candidates
    )
    floor = min(ivf.nlist, NPROBE_MIN)
    if nprobe < floor:  # cheap insurance for queries less like the catalogue than its own rows
        reason += f"; nprobe raised from the measured {nprobe} to the floor {floor}"
        nprobe = floor
    return {
        "nprobe": nprobe,
        # what the sample needs, before the floor (policy.visit_nprobe shares the floor)
        "saturated_nprobe": _saturated(table, candidates, target, nprobe),
        "candidates": candidates,
        "recall": round(recall, 4),
        "target": target,
        "k": k,
        "queries": len(rows),
        "reason": (
            f"tuned on {len(rows)} sample rows (leave-one-out, exact float32 truth): "
            f"{candidates} rerank candidates give recall@{k} {recall:.3f}; "
            f"{reason}"
        ),
        "table": [{**t, "recall": round(t["recall"], 4)} for t in table],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def saturated_nprobe(meta: dict) -> int | None:
    """The fewest lists a version's tuning found enough (``SATURATED``), before the floor; None
    when untuned. Versions built before it was recorded: derived from their tuning table."""
    tuning = meta.get("tuning") or {}
    if not tuning:
        return None
    if tuning.get("saturated_nprobe"):
        return int(tuning["saturated_nprobe"])
    target = tuning.get("target", TARGET_RECALL)
    table = tuning.get("table", [])
    return _saturated(table, tuning.get("candidates"), target, tuning.get("nprobe"))


def _saturated(table: list[dict], candidates, target: float, chosen) -> int:
    """The smallest nprobe whose recall at ``candidates`` is within ``SATURATED`` of the best
    measured there, and not below the first that reaches ``target`` (``chosen``, the tuned
    nprobe, when the table has no such row)."""
    rows = [t for t in table if t.get("candidates") == candidates]
    if not rows:
        return int(chosen or 1)
    best = max(t["recall"] for t in rows)
    enough = min(t["nprobe"] for t in rows if t["recall"] >= best - SATURATED)
    reached = [t["nprobe"] for t in rows if t["recall"] >= target]
    return int(max(enough, min(reached))) if reached else int(enough)


def _drop_self(found: np.ndarray, row: int) -> np.ndarray:
    return found[found != row]


def _powers_of_two(limit: int) -> list[int]:
    values, p = [], 1
    while p <= limit:
        values.append(p)
        p *= 2
    return values


def find_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF index inside ``index`` (through pre-transforms), or None for a flat index."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
