"""Exact rerank: rescore candidate rows with their stored full-precision vectors.

Scores are computed row by row (``np.einsum``'s sum of products along the vector, in one fixed
order, no BLAS blocking), so a (query, row) pair gets the same float32 score in whatever batch,
shard or process it is scored: per-shard results then merge exactly, and sharded and unsharded
searches that retrieve the same rows rank them identically. Ties are broken by row key. (einsum
against the elementwise product and ``sum``: 64 against 191 us for 16 queries x 100 candidates
x 256-d, without the product's temporary array.)

A shard's own search does its rerank in FAISS instead (``index.ann.refine``: the candidates and
their float16 rescoring in one C++ call, the same scores to float32 rounding, and likewise one
score per pair in any batch); this module serves the rest (a delta's blocks, the build's
tuning, rows a FAISS view cannot wrap) and ranks (``best_k``).
"""

from __future__ import annotations

import functools

import faiss
import numpy as np

CHUNK_ELEMENTS = 4_000_000  # float32 elements gathered per step (~16 MB)


def exact_scores(
    vectors: np.ndarray, metric: str, queries: np.ndarray, keys: np.ndarray
) -> np.ndarray:
    """(nq, n) exact scores of each query against its candidate rows; -1 keys score worst."""
    nq, n = keys.shape
    dim = vectors.shape[1]
    out = np.empty((nq, n), np.float32)
    worst = -np.inf if metric == "ip" else np.inf
    step = max(1, CHUNK_ELEMENTS // max(1, n * dim))
    for start in range(0, nq, step):
        block = keys[start : start + step]
        valid = block >= 0
        gathered = vectors[np.where(valid, block, 0).ravel()]
        x = as_float32(gathered).reshape(len(block), n, dim)
        qb = queries[start : start + step]
        if metric == "ip":
            s = np.einsum("qnd,qd->qn", x, qb)
        else:
            x -= qb[:, None, :]  # x is this step's own float32 copy
            s = np.einsum("qnd,qnd->qn", x, x)
        s[~valid] = worst
        out[start : start + step] = s
    return out


def as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32, the same values (and bits) as ``x.astype(np.float32)``.

    numpy converts float16 one element at a time here (~1.7 ns each: for 16 shards x 100
    candidates x 256-d, 0.7 ms a query, more than the FAISS searches); FAISS's float16 scalar
    quantizer decodes the same bits in C++ (``sa_decode`` of the rows' bytes as its codes): 4.5
    against 10.9 ms for 25,600 rows of 256-d (numpy), 9.2 for whole-array integer operations."""
    if x.dtype != np.float16:
        return x.astype(np.float32, copy=False)
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)
    decoded = _half_decoder(rows.shape[1]).sa_decode(rows.view(np.uint8))
    return decoded.reshape(x.shape)


@functools.cache
def _half_decoder(dim: int) -> faiss.IndexScalarQuantizer:
    """A float16 scalar quantizer of ``dim`` (no training: its codes are the halves' bytes);
    FAISS only reads it to decode, so one is shared by every thread."""
    return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)


def best_k(
    scores: np.ndarray, keys: np.ndarray, metric: str, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (score, key) pairs per row, best first, ties by key; -1 keys last."""
    k = min(k, keys.shape[1])
    valid = keys >= 0
    primary = -scores if metric == "ip" else scores
    tie_key = np.where(valid, keys, np.iinfo(np.int64).max)
    order = _order(primary, tie_key, k)
    top_keys = np.where(
        np.take_along_axis(valid, order, axis=1), np.take_along_axis(keys, order, axis=1), -1
    )
    return np.take_along_axis(scores, order, axis=1), top_keys


def _order(primary: np.ndarray, tie_key: np.ndarray, k: int) -> np.ndarray:
    """Per row, the positions of the ``k`` smallest ``(primary, tie_key)`` pairs in that order.

    A sort of every candidate (hundreds per shard per query) only to keep ``k``: for a batch of
    queries the ``k`` smallest are partitioned out first and only they are sorted (16 queries
    x 800 candidates, k=10: 0.37 ms against 0.90 for the sort), except in a row where
    a value equal to the k-th lies outside them (a tie the partition cut arbitrarily), which is
    sorted whole. The same positions as ``np.lexsort((tie_key, primary))[:, :k]``.
    """
    nq, n = primary.shape
    # few candidates, or one query (measured: the sort of 800 is as fast as the extra calls)
    if n <= 2 * k or nq == 1:
        return np.lexsort((tie_key, primary), axis=1)[:, :k]
    part = np.argpartition(primary, k - 1, axis=1)
    top, rest = part[:, :k], part[:, k:]
    top_primary = np.take_along_axis(primary, top, axis=1)
    kth = top_primary.max(axis=1)
    tied = np.take_along_axis(primary, rest, axis=1).min(axis=1) == kth
    inner = np.lexsort((np.take_along_axis(tie_key, top, axis=1), top_primary), axis=1)
    order = np.take_along_axis(top, inner, axis=1)
    if tied.any():
        order[tied] = np.lexsort((tie_key[tied], primary[tied]), axis=1)[:, :k]
    return order
