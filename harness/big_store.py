"""Stores too big to hold in RAM: written block by block, with their exact truth, and the peak
memory of every stage that touches them (``benchmarks/scale.py``'s 10M vectors).

``write_mixture_store`` draws ``synthetic.mixture_blocks`` (the first ``queries`` draws are the
queries, the next ``n`` the catalogue), writes each block as one part per shard (as
``harness.stores.write_store`` and the embedding job do) and folds the block into every query's
exact top-k (float32 inner product, FAISS ``knn``) before drawing the next: the whole catalogue
is never in memory. ``write_and_build``, ``loaded_report`` and ``http_report`` are the stages
of such a benchmark (write and build the store, load its shards in-process, serve it over HTTP);
``build_one_shard`` and ``time_interleaved`` measure one shard's search cost against its size.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np

from harness import serve_runs, synthetic
from harness.closed_loop import single_query_p50
from harness.samplers import PeakRss
from harness.stores import write_store
from index.storage.store import Store


def fold_topk(best: tuple[np.ndarray, np.ndarray], scores, rows, k: int):
    """The top-``k`` (scores, rows) of ``best`` and a new block's candidates, per query."""
    all_scores = np.concatenate([best[0], scores], axis=1)
    all_rows = np.concatenate([best[1], rows], axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_rows, order, 1)


def write_mixture_store(
    store: Store,
    n: int,
    dim: int,
    shards: int,
    queries: int,
    k: int = 10,
    block: int = 500_000,
    progress: bool = True,
) -> tuple[np.ndarray, list[list[str]]]:
    """Write ``n`` mixture vectors into ``store`` (``shards`` shards, one part per shard per
    block) and return the ``queries`` held-out query vectors and the ids of their exact top-k."""
    import faiss

    blocks = synthetic.mixture_blocks(queries + n, dim, chunk=block)
    first, _ = next(blocks)
    held_out, rest = first[:queries].copy(), first[queries:]
    best = (np.full((queries, k), -np.inf, np.float32), np.full((queries, k), -1, np.int64))
    written, number, t = 0, 0, time.perf_counter()
    while True:
        ids, uris = synthetic.synthetic_rows(len(rest), start=written)
        write_store(
            store,
            ids,
            uris,
            rest,
            shards,
            model=synthetic.MODEL,
            weights=synthetic.WEIGHTS,
            part_key=f"b{number:05d}",
        )
        scores, rows = faiss.knn(held_out, rest, k, metric=faiss.METRIC_INNER_PRODUCT)
        best = fold_topk(best, scores, rows + written, k)
        written, number = written + len(rest), number + 1
        if progress:
            rate = written / (time.perf_counter() - t)
            print(f"written {written:,} / {n:,} rows ({rate:,.0f} rows/s)", flush=True)
        rest = next(blocks, (None, None))[0]
        if rest is None:
            break
    truth = [synthetic.synthetic_rows(1, start=int(r))[0][0] for r in best[1].ravel()]
    return held_out, [truth[i : i + k] for i in range(0, len(truth), k)]


def write_and_build(args, store_uri: str, rss: PeakRss, k: int = 10) -> dict:
    """Stages ``write`` and ``build`` of ``args.n`` x ``args.dim`` in ``args.shards`` shards (the
    queries and their truth kept in ``args.workdir``) into an empty store, an earlier run's
    removed first (its shards, built and up to date, would be measured again); the build job's
    summary."""
    from pipelines.build_index import BuildConfig, run
    from pipelines.local_ray import init_local_ray

    if Path(store_uri).exists():  # an earlier run's: its built shards would pass for this one's
        print(f"removing the earlier run's store {store_uri} (--reuse keeps it)")
        shutil.rmtree(store_uri)
    with rss.stage("write"):
        queries, truth = write_mixture_store(
            Store(store_uri), args.n, args.dim, args.shards, args.queries, k, args.block
        )
    np.save(args.workdir / "queries.npy", queries)
    (args.workdir / "truth.json").write_text(json.dumps(truth))
    with rss.stage("build"):
        ray = init_local_ray(args.workdir / "ray", num_cpus=2)
        try:
            summary = run(BuildConfig(store=store_uri, memory_budget=args.memory_budget))
        finally:
            ray.shutdown()
    if summary.failed or summary.superseded:
        raise SystemExit(f"build failed: {summary.line()}")
    return {"line": summary.line(), "shard_seconds": summary.shard_seconds}


def loaded_report(store_uri: str, shards: int, queries, truth, k: int = 10) -> dict:
    """The shards loaded as a replica loads them: what they hold per vector, their recall@k
    with the index's defaults, and one shard's single-query search cost (1 thread)."""
    import faiss

    from index.ann.shard_index import ShardIndex
    from index.live.recall import recall_at_k, search_all

    faiss.omp_set_num_threads(1)  # as each searcher replica
    loaded = [ShardIndex.load(Store(store_uri), s) for s in range(shards)]
    n = sum(s.count for s in loaded)
    parts: dict[str, int] = {}
    for shard in loaded:
        for key, value in shard.memory_breakdown().items():
            parts[key] = parts.get(key, 0) + int(value)
    found = search_all(loaded, queries, k)
    return {
        "rows": n,
        "rows_per_shard": [s.count for s in loaded],
        "factory": sorted({s.meta["factory"] for s in loaded}),
        "bytes_per_vector": {name: round(v / n, 2) for name, v in parts.items()},
        "ram_bytes_per_vector": round(
            (parts["total"] + parts["rows"] + parts["vectors_mmap"]) / n, 1
        ),
        f"recall_at_{k}": round(recall_at_k(found, truth, k), 4),
        "one_shard_search_p50_ms": single_query_p50(lambda q: loaded[0].search(q, k), queries),
    }


def http_report(args, store_uri: str, queries, truth, k: int = 10) -> dict:
    """``serve_runs.over_http`` in the default mode on Serve's own port (HAProxy), with recall
    against ``truth`` (ids per query)."""
    run = copy.copy(args)
    run.modes, run.entries, run.candidates = ["haproxy"], ["proxy"], None
    ids = [i for row in truth for i in row]
    rows = np.arange(len(ids)).reshape(len(truth), k)
    return serve_runs.over_http(run, store_uri, queries, rows, ids)["haproxy"]


def build_one_shard(
    n: int, dim: int, queries: np.ndarray, workdir, block: int = 500_000, threads: int = 2
) -> dict:
    """One shard of ``n`` rows (the store's first ``n`` catalogue vectors: the same draws, in
    ``write_mixture_store``'s ``block``) built by ``build_arrays`` under the policy, as a
    rebuild builds it (``threads`` FAISS threads), into ``workdir/cost-<n>``; timed later, with
    the others, by ``time_interleaved``."""
    import shutil

    import faiss

    from index.ann.build import build_arrays

    vectors = synthetic.gaussian_mixture(len(queries) + n, dim, chunk=block)[len(queries) :]
    ids, uris = synthetic.synthetic_rows(n)
    out = Path(workdir) / f"cost-{n}"
    shutil.rmtree(out, ignore_errors=True)
    faiss.omp_set_num_threads(threads)
    t = time.perf_counter()
    build_arrays(vectors, ids, uris, out, None, "ip", memory_budget="16G")
    return {"rows": n, "dir": str(out), "build_seconds": round(time.perf_counter() - t, 1)}


def time_interleaved(store_uri: str, built: list[dict], queries: np.ndarray, k: int = 10):
    """Single-query search ms p50 (1 thread) of the store's shard 0 and each ``build_one_shard``
    build, the shards taking turns query by query: CPU steal on these VMs changes from minute to
    minute (0-25 % within one run), and interleaving gives every shard the same share of it. A
    first pass maps the pages the rerank rows sit on (first-touch faults cost as much as the
    search); the second is timed. Returns the cost(n) points; the builds are deleted."""
    import shutil

    import faiss

    from index.ann.shard_index import ShardIndex

    faiss.omp_set_num_threads(1)
    shards = [("store shard", ShardIndex.load(Store(store_uri), 0))]
    shards += [
        (f"one-shard build ({b['build_seconds']} s)", ShardIndex.open_dir(b["dir"])) for b in built
    ]
    times: list[list[float]] = [[] for _ in shards]
    for timed in (False, True):
        for q in queries[:200]:
            for i, (_, shard) in enumerate(shards):
                t = time.perf_counter()
                shard.search(q[None, :], k)
                if timed:
                    times[i].append(time.perf_counter() - t)
    points = [
        {
            "rows": shard.count,
            "source": source,
            "factory": shard.meta["factory"],
            "nprobe": shard.default_nprobe,
            "candidates": shard.meta.get("candidates"),
            "search_p50_ms": round(float(np.median(ms)) * 1000, 3),
        }
        for (source, shard), ms in zip(shards, times, strict=True)
    ]
    for b in built:
        shutil.rmtree(b["dir"], ignore_errors=True)
    print(f"cost(n), interleaved: {points}", flush=True)
    return points


def cost_points(result: dict) -> list[tuple[int, float]]:
    """(rows, one shard's search ms) of a ``scale.json``'s interleaved cost(n) timing."""
    return [(p["rows"], p["search_p50_ms"]) for p in result.get("cost_curve", [])]
