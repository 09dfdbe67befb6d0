"""The rerank's top-k order (``index.ann.rerank.best_k``): a partition then a sort of the k
kept, the same positions as sorting every candidate by (score, key), ties and all."""

from __future__ import annotations

import numpy as np
import pytest

from index.ann.rerank import best_k


def sorted_whole(scores, keys, metric, k):
    """The definition: every candidate sorted by (score, key), -1 keys last."""
    k = min(k, keys.shape[1])
    valid = keys >= 0
    primary = -scores if metric == "ip" else scores
    order = np.lexsort((np.where(valid, keys, np.iinfo(np.int64).max), primary), axis=1)[:, :k]
    top = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(keys, order, 1), -1)
    return np.take_along_axis(scores, order, 1), top


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_best_k_equals_sorting_every_candidate_with_ties_and_missing_rows(metric):
    rng = np.random.default_rng(7)
    for trial in range(600):
        nq, n, k = int(rng.integers(1, 6)), int(rng.integers(1, 400)), int(rng.integers(1, 40))
        if trial % 2:  # a few distinct values: ties everywhere, across the k-th place too
            scores = (rng.integers(0, 4, (nq, n)) / 4).astype(np.float32)
        else:
            scores = rng.standard_normal((nq, n)).astype(np.float32)
        keys = rng.permutation(10 * nq * n)[: nq * n].reshape(nq, n).astype(np.int64)
        keys[rng.random((nq, n)) < 0.1] = -1  # padded candidate lists
        scores[keys < 0] = -np.inf if metric == "ip" else np.inf
        got, want = best_k(scores, keys, metric, k), sorted_whole(scores, keys, metric, k)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_float16_vectors_become_the_same_float32_bits_as_numpy_makes_them():
    from index.ann.rerank import as_float32

    every = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(256, 256)  # inf, NaN too
    got = as_float32(every)
    assert got.dtype == np.float32 and got.shape == every.shape
    assert np.array_equal(got.view(np.uint32), every.astype(np.float32).view(np.uint32))
    assert as_float32(np.ones(3, np.float64)).dtype == np.float32
