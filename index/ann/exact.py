"""Exact (brute-force) top-k: the one implementation every exact search in the project uses.

The recall ground truth (``index.live.recall``), a version's reference search
(``ShardIndex.search_exact``), the build's tuning (``index.ann.tune``) and the delta of rows not
yet indexed (``index.live.snapshot``) all rank by the same arithmetic, so their answers agree
with each other and with the rerank (``index.ann.rerank``): scores are float32 inner products,
or squared L2 distances ``|q|^2 - 2 q.x + |x|^2`` clipped at 0, and ties go to the lower row
index.

Vectors may be float16 or memory-mapped: they are converted ``CHUNK_ELEMENTS`` at a time, so
a search over a large shard never holds a float32 copy of it. ``valid`` masks rows out (dead
delta rows) without copying the live ones.
"""

from __future__ import annotations

import numpy as np

from index.ann.queries import check_k

CHUNK_ELEMENTS = 4_000_000  # float32 elements converted per step (~16 MB)


def exact_search(
    queries: np.ndarray,
    vectors: np.ndarray,
    k: int,
    metric: str,
    *,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)`` of the ``k`` best rows of ``vectors`` per query, best first.

    Both are ``(len(queries), k)``; when fewer than ``k`` rows qualify, rows are -1 and scores
    NaN past the end. ``metric`` is ``"ip"`` (higher is better) or ``"l2"`` (lower is better).
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    n, nq = len(vectors), len(q)
    check_k(k)
    best_s = np.zeros((nq, 0), np.float32)
    best_i = np.zeros((nq, 0), np.int64)
    worst = -np.inf if metric == "ip" else np.inf
    step = max(1, CHUNK_ELEMENTS // max(1, q.shape[1]))
    q_norm = np.square(q).sum(axis=1, keepdims=True) if metric == "l2" else None
    for start in range(0, n, step):
        x = np.asarray(vectors[start : start + step], dtype=np.float32)
        dots = q @ x.T
        if metric == "ip":
            s = dots
        else:
            s = np.maximum(q_norm - 2 * dots + np.square(x).sum(axis=1)[None, :], 0)
        if valid is not None:
            s[:, ~valid[start : start + len(x)]] = worst
        rows = np.broadcast_to(np.arange(start, start + len(x)), s.shape)
        if s.shape[1] > k:  # each query's k best of this chunk, then merge with the best so far
            key = -s if metric == "ip" else s
            top = np.argpartition(key, k - 1, axis=1)[:, :k]
            s, rows = np.take_along_axis(s, top, axis=1), np.take_along_axis(rows, top, axis=1)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, rows], axis=1)
        key = -best_s if metric == "ip" else best_s
        order = np.lexsort((best_i, key), axis=1)[:, :k]
        best_s = np.take_along_axis(best_s, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
    scores = np.full((nq, k), np.nan, np.float32)
    rows = np.full((nq, k), -1, np.int64)
    width = best_s.shape[1]
    scores[:, :width], rows[:, :width] = best_s, best_i
    rows[~np.isfinite(scores)] = -1  # masked-out rows never count as found
    scores[rows < 0] = np.nan
    return scores, rows
