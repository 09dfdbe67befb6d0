"""A large shard's coarse quantizer is an HNSW graph over its centroids (``index.ann.policy``):
the rule, the centroids it holds (exact k-means's), and every reader of the lists through it."""

from __future__ import annotations

import faiss
import numpy as np

from index.ann.build import build_arrays
from index.ann.ivf_lists import exact_quantizer
from index.ann.memory import index_memory
from index.ann.policy import (
    HNSW_QUANTIZER_EF_CONSTRUCTION,
    HNSW_QUANTIZER_MIN_NLIST,
    IndexSpec,
    choose_index,
)
from index.ann.shard_index import ShardIndex

DIM = 32


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM)).astype(np.float32) * 3
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _spec(coarse: str) -> IndexSpec:
    factory = f"{coarse},PQ16x4fsr"
    return IndexSpec("ivfpq", factory, nlist=64, pq_m=16, nbits=4, train_size=6000, nprobe=8)


def _centroids(shard: ShardIndex) -> np.ndarray:
    return exact_quantizer(shard._ivf).reconstruct_n(0, shard.nlist)


def test_the_rule_gives_large_shards_the_graph_and_small_ones_the_scan():
    big = choose_index(1_000_000, 256)
    small = choose_index(250_000, 256)
    assert big.nlist >= HNSW_QUANTIZER_MIN_NLIST > small.nlist
    assert big.factory.startswith(f"IVF{big.nlist}_HNSW32,") and "HNSW" in big.reasons[-1]
    assert small.factory.startswith(f"IVF{small.nlist},")


def test_a_graph_quantized_shard_is_trained_like_a_scanned_one_and_answers_alike(tmp_path):
    x = _rows(6000)
    ids = [f"r{i}" for i in range(len(x))]
    shards = {}
    for name, coarse in (("scan", "IVF64"), ("graph", "IVF64_HNSW32")):
        build_arrays(x, ids, ids, tmp_path / name, _spec(coarse), "ip", tune=False)
        shards[name] = ShardIndex.open_dir(tmp_path / name)
    scan, graph = shards["scan"], shards["graph"]
    assert isinstance(faiss.downcast_index(graph._ivf.quantizer), faiss.IndexHNSW)
    # exact k-means on the same sample: the graph holds the centroids the scan does
    np.testing.assert_allclose(_centroids(graph), _centroids(scan), atol=1e-5)

    q = _rows(40, seed=1)
    want = [[h.id for h in row] for row in scan.search(q, 10, candidates=200)]
    got = [[h.id for h in row] for row in graph.search(q, 10, candidates=200)]
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)])
    assert same >= 0.95, same

    # a filtered search orders every list exactly (the graph need not reach them all)
    order = graph._lists.order(q)
    assert order.shape == (len(q), 64)
    assert all(sorted(row) == list(range(64)) for row in order.tolist())
    np.testing.assert_array_equal(order, scan._lists.order(q))

    # the graph's links are in the memory the version reports
    assert index_memory(graph._index)["centroids"] > index_memory(scan._index)["centroids"]


def test_k_means_assigns_the_training_rows_exactly_not_through_the_graph():
    # FAISS trains the centroids first and only then fills the graph with them: a graph too
    # sparse to assign rows right (4 links, 1 candidate) still gets the scan's centroids
    x = _rows(256 * 39, seed=3)
    centroids, indexes = {}, []
    for coarse in ("IVF256", "IVF256_HNSW4"):
        index = faiss.index_factory(DIM, f"{coarse},PQ16x4fsr", faiss.METRIC_INNER_PRODUCT)
        indexes.append(index)  # the quantizer below lives as long as its index
        ivf = faiss.extract_index_ivf(index)
        graph = faiss.downcast_index(ivf.quantizer)
        if isinstance(graph, faiss.IndexHNSW):
            graph.hnsw.efSearch = 1
        index.train(x)
        centroids[coarse] = exact_quantizer(ivf).reconstruct_n(0, 256)
    np.testing.assert_allclose(centroids["IVF256_HNSW4"], centroids["IVF256"], atol=1e-5)


def test_every_row_sits_in_its_nearest_list_not_where_the_graph_guesses(tmp_path):
    x = _rows(256 * 39, seed=4)
    ids = [f"r{i}" for i in range(len(x))]
    spec = IndexSpec(
        "ivfpq", "IVF256_HNSW4,PQ16x4fsr", nlist=256, pq_m=16, nbits=4, train_size=len(x),
        nprobe=8,
    )  # fmt: skip
    build_arrays(x, ids, ids, tmp_path / "v1", spec, "ip", tune=False)
    trained = ShardIndex.open_dir(tmp_path / "v1")._index
    graph = faiss.downcast_index(faiss.extract_index_ivf(trained).quantizer)
    assert isinstance(graph, faiss.IndexHNSW) and graph.ntotal == 256
    assert graph.hnsw.efConstruction == HNSW_QUANTIZER_EF_CONSTRUCTION
    graph.hnsw.efSearch = 1  # a graph that guesses badly: filling through it would misplace rows
    _, nearest = exact_quantizer(faiss.extract_index_ivf(trained)).search(x, 1)
    _, guessed = graph.search(x, 1)
    assert np.mean(guessed[:, 0] == nearest[:, 0]) < 0.99
    build_arrays(x, ids, ids, tmp_path / "v2", spec, "ip", tune=False, trained=trained)
    list_of, _ = ShardIndex.open_dir(tmp_path / "v2")._lists.assignment()
    assert np.mean(list_of == nearest[:, 0]) > 0.999


def test_a_rebuild_reuses_the_graph_quantizer_untrained(tmp_path):
    x = _rows(6000)
    ids = [f"r{i}" for i in range(len(x))]
    build_arrays(x, ids, ids, tmp_path / "v1", _spec("IVF64_HNSW32"), "ip", tune=False)
    first = ShardIndex.open_dir(tmp_path / "v1")
    y = _rows(5000, seed=2)
    more = [f"s{i}" for i in range(len(y))]
    meta = build_arrays(
        y, more, more, tmp_path / "v2", _spec("IVF64_HNSW32"), "ip", tune=False,
        trained=first._index,
    )  # fmt: skip
    assert meta["build_seconds"]["train"] < 0.05  # nothing trained
    second = ShardIndex.open_dir(tmp_path / "v2")
    assert isinstance(faiss.downcast_index(second._ivf.quantizer), faiss.IndexHNSW)
    np.testing.assert_array_equal(_centroids(second), _centroids(first))
    assert second.count == len(y)
    assert [h.id for h in second.search(y[:1], 1, candidates=100)[0]] == ["s0"]
