"""Candidates and their exact rerank in one FAISS call, over the memory-mapped float16 rows.

A shard's search takes ``candidates`` rows from its compressed index and rescores them against
the shard's float16 vectors (``index.ann.rerank``). Done in numpy, the rescoring gathers the
rows, converts them to float32 and multiplies: for 16 shards of 62k rows x 256-d, 100
candidates each, 61 us a shard against 6 of FAISS's own search, and the float16 conversion
alone is half of it (numpy converts one element at a time). FAISS does the same rescoring in
C++ in ``IndexRefine``: the base index proposes, a float16 ``IndexScalarQuantizer``'s distance
computer scores each candidate from its code (SIMD float16 -> float32 and the product in one
pass, no gathered copy). Measured on this box, candidates and rerank of one shard, one query:
15 against 33 us a query at 62k rows (100 candidates), 126 against 265 at 1M rows (800).

The float16 index owns no codes: its code array is a *view* of the rows the shard already has
memory-mapped (``vectors.npy``, whose bytes are exactly float16 codes), so no row is copied and
nothing changes on disk. The view is only valid while that array lives: ``ShardIndex`` holds
both. (FAISS's Python wrapper cannot make a ``MaybeOwnedVector`` view with an owner, so the
vector's view fields are set directly; the index is never added to, which would reallocate.)

Scores are the same pairs' scores as ``index.ann.rerank.exact_scores`` to float32 rounding
(the sum runs in SIMD lanes, not einsum's order): each (query, row) pair is computed alone, in
a fixed order, so it gets the same score in whatever batch, shard or process it is scored, as
the merge across shards needs. Ties are broken by row key downstream (``rerank.best_k``).
"""

from __future__ import annotations

import faiss
import numpy as np

from index.ann.build import faiss_metric


def half_rows_index(rows: np.ndarray, metric: str) -> faiss.IndexScalarQuantizer | None:
    """A float16 FAISS index whose codes are ``rows``' own memory (no copy), or None when
    ``rows`` is not a C-contiguous 2-d float16 array. Valid while ``rows`` lives."""
    if rows.dtype != np.float16 or rows.ndim != 2 or not rows.flags.c_contiguous:
        return None
    n, dim = rows.shape
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss_metric(metric))
    data = rows.reshape(-1).view(np.uint8)
    codes = index.codes
    codes.is_owned = False
    codes.view_data = codes.c_ptr = faiss.swig_ptr(data)
    codes.view_size = codes.c_size = data.size
    index.ntotal = n
    return index


class RefinedSearch:
    """``base``'s candidates rescored exactly from ``rows`` (float16, one per base row), in
    one FAISS call: ``search`` returns every candidate, best first, with its exact score."""

    def __init__(self, base: faiss.Index, rows: np.ndarray, metric: str):
        self._rows = rows  # the float16 index's codes are this array's memory
        self._half = half_rows_index(rows, metric)
        if self._half is None or len(rows) != base.ntotal or rows.shape[1] != base.d:
            raise ValueError("refine needs C-contiguous float16 rows, one per base row")
        self._index = faiss.IndexRefine(base, self._half)
        self._worst = -np.inf if metric == "ip" else np.inf

    @classmethod
    def over(cls, base: faiss.Index, rows: np.ndarray, metric: str) -> RefinedSearch | None:
        """The refined search of ``base`` over ``rows``, or None when they do not allow it (the
        caller reranks in numpy then)."""
        try:
            return cls(base, rows, metric)
        except ValueError:
            return None

    @staticmethod
    def params(base_params: faiss.SearchParameters | None) -> faiss.SearchParameters:
        """A search's parameters: the base index's (nprobe, selector) inside, every candidate
        rescored (``k_factor`` 1: the caller asks for as many as it wants rescored)."""
        params = faiss.IndexRefineSearchParameters(k_factor=1.0)
        if base_params is not None:
            params.base_index_params = base_params
        params.referenced = base_params  # FAISS holds a plain pointer: keep it alive
        return params

    def search(
        self, q: np.ndarray, n: int, params: faiss.SearchParameters
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row keys), ``(len(q), n)``: ``n`` candidates of each query with their exact
        scores, best first; -1 keys (scored worst) pad short lists."""
        scores, keys = self._index.search(q, n, params=params)
        scores[keys < 0] = self._worst
        return scores, keys
