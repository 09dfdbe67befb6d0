"""Generated vectors and the stores built from them, for the index tests and the benchmarks.

``gaussian_mixture`` draws vectors closer to real embeddings than uniform noise (clustered,
anisotropic neighbourhoods), so IVF+PQ recall on them means something. ``synthetic_rows`` names
its rows, ``exact_topk`` is the ground truth (brute force in float32), and ``cached_store`` and
``cached_truth`` write and index a store of them, and its truth, once per size (the Serve
benchmarks share them under their work folder).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from harness.stores import write_store
from index.live.rebuild import RebuildOptions, rebuild_shard
from index.live.recall import recall_at_k
from index.rows.sharding import uri_id
from index.storage.manifest import load_manifest
from index.storage.store import Store

MODEL, WEIGHTS = "synthetic-gaussian-mixture", "seed0"


def mixture_blocks(
    n: int,
    dim: int,
    clusters: int = 1000,
    seed: int = 0,
    spread: float = 0.35,
    chunk: int = 250_000,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``gaussian_mixture``'s vectors (and clusters) ``chunk`` rows at a time, the same draws in
    the same order: a store of 10M rows is written without holding them all."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # each cluster gets its own scale so neighbourhood density varies as in real data
    scales = (spread * rng.uniform(0.5, 1.5, clusters) / np.sqrt(dim)).astype(np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        drawn = rng.integers(0, clusters, stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block = centres[drawn] + noise * scales[drawn, None]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        yield block, drawn


def gaussian_mixture(
    n: int, dim: int, labels: bool = False, **draw
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised vectors around ``clusters`` random centres: closer to real embeddings
    (clustered, anisotropic neighbourhoods) than uniform noise, so IVF+PQ recall means something.
    With ``labels``, also each vector's cluster (metadata correlated with the vectors, as a
    catalogue's category is); the vectors are the same either way. ``draw``: ``clusters``,
    ``seed``, ``spread``, ``chunk`` as ``mixture_blocks`` takes them.
    """
    out = np.empty((n, dim), dtype=np.float32)
    cluster = np.empty(n, dtype=np.int32)
    start = 0
    for block, drawn in mixture_blocks(n, dim, **draw):
        out[start : start + len(block)] = block
        cluster[start : start + len(block)] = drawn
        start += len(block)
    return (out, cluster) if labels else out


def base_and_queries(n: int, queries: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors of the mixture (seed 0) and ``queries`` held-out draws of the same one."""
    x = gaussian_mixture(n + queries, dim, seed=0)
    return x[:n], x[n:]


def synthetic_rows(n: int, start: int = 0) -> tuple[list[str], list[str]]:
    """Ids and URIs of ``n`` generated rows from row ``start`` (the id is the URI's, as the
    embedding job's)."""
    uris = [f"synthetic://gaussian-mixture/{i}" for i in range(start, start + n)]
    return [uri_id(u) for u in uris], uris


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip") -> np.ndarray:
    """Row numbers of each query's exact top-``k`` in ``base`` (float32 brute force)."""
    import faiss

    index = faiss.IndexFlatIP(base.shape[1]) if metric == "ip" else faiss.IndexFlatL2(base.shape[1])
    index.add(np.ascontiguousarray(base))
    return index.search(queries, k)[1]


def cached_truth(workdir: Path, base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``exact_topk`` (inner product), kept in ``workdir`` and reused for the same sizes."""
    path = Path(workdir) / f"gt-{len(base)}-{base.shape[1]}-{len(queries)}.npy"
    if not path.exists():
        t = time.perf_counter()
        np.save(path, exact_topk(base, queries, k))
        print(f"exact top-{k} of {len(queries)} queries in {time.perf_counter() - t:.1f} s")
    return np.load(path)


def recall_of_rows(found: list[list[str]], truth_rows: np.ndarray, ids: list[str], k: int) -> float:
    """recall@k of the ids ``found`` against exact top-k row numbers."""
    return recall_at_k(found, [[ids[r] for r in row] for row in truth_rows], k)


def cached_store(
    workdir: Path,
    base: np.ndarray,
    ids: list[str],
    uris: list[str],
    shards: int,
    memory_budget: str,
    metadata=None,
) -> dict:
    """``workdir/store-<n>-<dim>-<shards>[-meta]`` written in parts of <= 100k rows (as a job
    writes them) and indexed shard by shard, unless a complete one is already there; returns
    its URI and the timings. ``metadata`` (a pyarrow table, one row per vector) is stored as
    typed metadata columns."""
    n, dim = base.shape
    suffix = "" if metadata is None else "-meta"
    store = Store(Path(workdir) / f"store-{n}-{dim}-{shards}{suffix}")
    manifest = load_manifest(store)
    if manifest and all(s.version is not None for s in manifest.shards.values()):
        if sum(s.count for s in manifest.shards.values()) == n:
            print(f"reusing the built store {store.uri}")
            return {"store": store.uri, "reused": True}
    timings: dict = {"store": store.uri, "reused": False}
    t = time.perf_counter()
    write_store(
        store,
        ids,
        uris,
        base,
        shards,
        model=MODEL,
        weights=WEIGHTS,
        metadata=metadata,
        part_rows=100_000,
    )
    timings["write_parquet_s"] = round(time.perf_counter() - t, 1)
    timings["build_s"] = {}
    for shard in range(shards):
        t = time.perf_counter()
        result = rebuild_shard(store, shard, RebuildOptions(memory_budget=memory_budget))
        timings["build_s"][shard] = round(time.perf_counter() - t, 1)
        print(f"shard {shard}: {result['count']:,} rows, {timings['build_s'][shard]} s")
    return timings
