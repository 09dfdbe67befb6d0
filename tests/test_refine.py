"""Candidates and their exact rerank in one FAISS call (``index.ann.refine``): the float16 rows
are the FAISS index's codes without a copy, the scores are the numpy rerank's (to float32
rounding) and the same in any batch, and a shard answers with it what it answered without."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index.ann.build import build_arrays
from index.ann.policy import IndexSpec
from index.ann.refine import RefinedSearch, half_rows_index
from index.ann.rerank import exact_scores
from index.ann.shard_index import ShardIndex


def _faiss_metric(metric):
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _rows(n=3000, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_float16_index_reads_the_rows_own_memory():
    rows = _rows(100, 16).astype(np.float16)
    index = half_rows_index(rows, "ip")
    assert index.ntotal == 100 and index.codes.size() == rows.nbytes
    q = np.ones((1, 16), np.float32)
    before = index.search(q, 1)[0][0, 0]
    rows[:] = 0  # written through the array: the index sees it, so it copied nothing
    assert index.search(q, 1)[0][0, 0] == 0 != before
    assert half_rows_index(rows.astype(np.float32), "ip") is None  # not float16: no view
    assert half_rows_index(np.asfortranarray(rows[:, :8]), "ip") is None  # not contiguous


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_refined_candidates_are_the_base_candidates_exactly_scored_best_first(metric):
    x = _rows()
    base = faiss.index_factory(32, "IVF16,PQ16x4fs", _faiss_metric(metric))
    base.train(x)
    base.add(x)
    rows = x.astype(np.float16)
    refined = RefinedSearch.over(base, rows, metric)
    q = _rows(20, 32, seed=1)
    hidden = faiss.IDSelectorNot(faiss.IDSelectorRange(0, len(x) - 30))  # 30 rows visible
    for sel, n in ((None, 200), (hidden, 50)):
        plain = faiss.SearchParametersIVF(nprobe=4, sel=sel)
        want_scores, want_keys = base.search(q, n, params=plain)
        scores, keys = refined.search(q, n, RefinedSearch.params(plain))
        for i in range(len(q)):  # the same candidates ...
            assert set(keys[i][keys[i] >= 0]) == set(want_keys[i][want_keys[i] >= 0])
        exact = exact_scores(rows, metric, q, keys)  # ... scored as the numpy rerank does
        valid = keys >= 0
        np.testing.assert_allclose(scores[valid], exact[valid], rtol=1e-5, atol=1e-5)
        best = np.where(valid, -scores if metric == "ip" else scores, np.inf)
        assert np.array_equal(best, np.sort(best, axis=1))  # best first, padding last ...
        assert (scores[~valid] == (-np.inf if metric == "ip" else np.inf)).all()  # scored worst
    assert (keys < 0).any()  # the hidden rows left short lists


def test_a_pair_gets_the_same_score_in_any_batch():
    x = _rows()
    base = faiss.index_factory(32, "IVF16,PQ16x4fs", faiss.METRIC_INNER_PRODUCT)
    base.train(x)
    base.add(x)
    refined = RefinedSearch.over(base, x.astype(np.float16), "ip")
    q = _rows(16, 32, seed=2)
    params = RefinedSearch.params(faiss.SearchParametersIVF(nprobe=16))
    together = refined.search(q, 100, params)
    for i in (0, 7, 15):
        alone = refined.search(q[i : i + 1], 100, params)
        assert dict(zip(alone[1][0], alone[0][0], strict=True)) == dict(
            zip(together[1][i], together[0][i], strict=True)
        )


@pytest.mark.parametrize("factory", ["IVF32,PQ16x4fsr", "OPQ16,IVF32,PQ16x4fsr"])
def test_a_shard_answers_the_same_with_the_faiss_rerank_as_with_numpys(tmp_path, factory):
    x = _rows(4000, 32)
    ids = [f"r{i}" for i in range(len(x))]
    spec = IndexSpec("ivfpq", factory, nlist=32, pq_m=16, nbits=4, train_size=4000, nprobe=8)
    build_arrays(x, ids, ids, tmp_path / "v", spec, "ip", tune=False)
    shard = ShardIndex.open_dir(tmp_path / "v")
    assert shard._refined is not None  # float16 rows of an IVF index: the FAISS path
    q = _rows(30, 32, seed=3)
    hits = shard.search(q, 10, candidates=200)
    pool = shard.scored_candidates(q, 10, candidates=200)
    shard._refined = None  # the numpy rerank
    want = shard.search(q, 10, candidates=200)
    assert [[h.id for h in row] for row in hits] == [[h.id for h in row] for row in want]
    for got_row, want_row in zip(hits, want, strict=True):
        np.testing.assert_allclose(
            [h.score for h in got_row], [h.score for h in want_row], rtol=1e-5, atol=1e-5
        )
    scores, keys = shard.scored_candidates(q, 10, candidates=200)
    for i in range(len(q)):
        assert set(pool[1][i]) == set(keys[i])
