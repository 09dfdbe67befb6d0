"""Shard index build cost and recall: 1M generated vectors (Gaussian mixture, 256-d) in 1, 2, 4
and 8 shards, built in parallel as Ray tasks by ``pipelines/build_index.py``.

Per shard count: build wall seconds (and the sum of the shards' own build seconds, to show the
parallelism), bytes per vector in RAM (PQ codes + ids as allocated in the inverted lists; and the
whole loaded index with centroids), bytes per vector on disk (index.faiss alone, and the whole
version with rows and float16 vectors), and recall@10 over nprobe with and without exact rerank,
against exact float32 search on the same data (1,000 queries), scattered and merged as served.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/index_build.py [--quick]

Writes benchmarks/results/index_build.json (headline keys at top level) and index_build.png.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/index_build.py --sizes 100000
    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/index_build.py --sizes 4000000 --shards 4,8

``--sizes`` runs the same measurement at each N (1M writes index_build.json, other sizes
index_build_<N>.json), then ``index_build_sizes.json``/``.png`` gathers every size measured so far:
build seconds, bytes per vector and parallel speedup (sum of shard builds / wall) vs N and shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness.stores import write_store  # noqa: E402
from harness.synthetic import exact_topk, gaussian_mixture  # noqa: E402
from index.ann.shard_index import ShardIndex  # noqa: E402
from index.live.recall import recall_at_k, search_all, sweep  # noqa: E402
from index.storage.store import Store  # noqa: E402

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CANDIDATES = (20, 50, 100, 200, 400, 800)  # rerank candidates per shard, at the default nprobe


def write_embeddings(
    root: Path, ids: np.ndarray, vectors: np.ndarray, num_shards: int, metric: str = "ip"
) -> Store:
    """The embedding job's output for these vectors: sharded Parquet parts of <= 250k rows."""
    uris = [f"gen://{i}" for i in ids]
    return write_store(
        root, list(ids), uris, vectors, num_shards, metric, model="generated", part_rows=250_000
    )


def bench_shards(
    store: Store, num_shards: int, n: int, args, queries, truth, with_exact: bool
) -> dict:
    from pipelines.build_index import BuildConfig, run

    # one shard: one task using both cores; more: one core per task, tasks side by side
    cpus = args.cores if num_shards == 1 else 1
    t = time.perf_counter()
    summary = run(
        BuildConfig(
            store=str(store.root),
            memory_budget=args.memory_budget,
            num_cpus=cpus,
            threads=cpus,
            progress=False,
        )
    )
    wall = time.perf_counter() - t
    if summary.failed or len(summary.built) != num_shards:
        raise RuntimeError(f"build failed: {summary.line()} {summary.failed}")
    shards = [ShardIndex.load(store, s) for s in range(num_shards)]
    mem = [s.memory_breakdown() for s in shards]
    disk_index = sum(s.meta["files"]["index.faiss"]["bytes"] for s in shards)
    disk_all = sum(sum(f["bytes"] for f in s.meta["files"].values()) for s in shards)
    codes_ids = sum(m["codes"] + m["ids"] for m in mem)
    result = sweep(shards, queries, truth, k=10, nprobes=NPROBES, with_exact=with_exact)
    # shards whose tuning picked different defaults: the largest (what every shard covers)
    nprobe = result["default_nprobe"]
    nprobe = max(nprobe) if isinstance(nprobe, list) else nprobe
    default = next(p for p in result["curve"] if p["nprobe"] == nprobe)
    by_candidates = {}
    for candidates in CANDIDATES:
        found = search_all(shards, queries, 10, candidates=candidates)
        by_candidates[candidates] = round(recall_at_k(found, truth, 10), 4)
    row = {
        "shards": num_shards,
        "factory": sorted({s.meta["factory"] for s in shards}),
        "rows_per_shard": [s.count for s in shards],
        "build_wall_seconds": round(wall, 2),
        "build_seconds_sum_of_shards": round(sum(summary.shard_seconds.values()), 2),
        "train_seconds_sum": round(sum(s.meta["build_seconds"]["train"] for s in shards), 2),
        "add_seconds_sum": round(sum(s.meta["build_seconds"]["add"] for s in shards), 2),
        "task_num_cpus": cpus,
        "bytes_per_vector_ram": round(codes_ids / n, 2),
        "bytes_per_vector_ram_index_total": round(sum(m["total"] for m in mem) / n, 2),
        "bytes_per_vector_disk_index": round(disk_index / n, 2),
        "bytes_per_vector_disk_version": round(disk_all / n, 2),
        "default_nprobe": result["default_nprobe"],
        "default_candidates": sorted({s.meta.get("candidates") for s in shards}),
        "tune_seconds_sum": round(sum(s.meta["build_seconds"].get("tune", 0) for s in shards), 2),
        "recall_at_10_rerank": default["recall_ivfpq_rerank"],
        "recall_at_10_no_rerank": default["recall_ivfpq"],
        "ms_per_query_rerank": round(default["ms_per_query_ivfpq_rerank"], 4),
        "recall_exact_float16": result.get("recall_exact"),
        "recall_at_10_rerank_by_candidates": by_candidates,
        "curve": result["curve"],
    }
    print(
        f"{num_shards} shard(s) {row['factory']}: build {wall:6.1f}s wall "
        f"({row['build_seconds_sum_of_shards']:.1f}s summed), "
        f"{row['bytes_per_vector_ram']:.1f} B/vec RAM codes+ids, "
        f"{row['bytes_per_vector_disk_index']:.1f} B/vec index on disk; "
        f"recall@10 at nprobe {row['default_nprobe']}: {row['recall_at_10_no_rerank']:.3f} -> "
        f"{row['recall_at_10_rerank']:.3f} with rerank",
        flush=True,
    )
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k vectors instead of 1M")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shards", default="1,2,4,8")
    parser.add_argument("--memory-budget", default="4G")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work-dir", default=None, help="scratch for the stores (deleted)")
    parser.add_argument("--name", default=None, help="result name (default index_build)")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated N values, e.g. 100000,4000000"
    )
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args(argv)
    shard_counts = [int(s) for s in args.shards.split(",")]
    if args.sizes:
        for n in [int(v) for v in args.sizes.split(",")]:
            name = "index_build" if n == 1_000_000 else f"index_build_{n}"
            if not args.plot_only:
                run_size(args, n, shard_counts, name)
        summarise_sizes()
        return
    n = args.n or (100_000 if args.quick else 1_000_000)
    name = args.name or ("index_build_quick" if args.quick else "index_build")
    if args.plot_only:
        common.replot(name, plot)
        return
    run_size(args, n, shard_counts, name)


def run_size(args, n: int, shard_counts: list[int], name: str) -> None:
    """Build and measure ``n`` vectors in each shard count; write ``<name>.json`` and PNG."""
    from pipelines.local_ray import init_local_ray, use_local_ray_env

    use_local_ray_env()
    work = Path(tempfile.mkdtemp(prefix="vs-ib-", dir=args.work_dir or "/tmp"))
    os.environ["TMPDIR"] = str(work)
    import faiss
    import ray

    t0 = time.perf_counter()
    data = gaussian_mixture(n + args.queries, args.dim, seed=0)
    base, queries = data[:n], data[n:]
    ids = np.array([f"{i:08d}" for i in range(n)], dtype=object)
    faiss.omp_set_num_threads(args.cores)
    t = time.perf_counter()
    truth_rows = exact_topk(base, queries, 10)
    truth = [[ids[i] for i in row] for row in truth_rows]
    print(f"data {n:,} x {args.dim} + exact truth in {time.perf_counter() - t0:.1f}s", flush=True)
    exact_seconds = time.perf_counter() - t

    init_local_ray(work / "ray", num_cpus=args.cores)
    rows = []
    try:
        for i, num_shards in enumerate(shard_counts):
            store_root = work / f"store-{num_shards}"
            t = time.perf_counter()
            store = write_embeddings(store_root, ids, base, num_shards)
            print(f"wrote {num_shards}-shard Parquet in {time.perf_counter() - t:.1f}s", flush=True)
            faiss.omp_set_num_threads(args.cores)
            rows.append(bench_shards(store, num_shards, n, args, queries, truth, i == 0))
            shutil.rmtree(store_root, ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    worst_rerank = min(rows, key=lambda r: r["recall_at_10_rerank"])
    result = {
        "recall_at_10_rerank": worst_rerank["recall_at_10_rerank"],
        "recall_at_10_no_rerank": min(r["recall_at_10_no_rerank"] for r in rows),
        "bytes_per_vector_ram": max(r["bytes_per_vector_ram"] for r in rows),
        "n_vectors": n,
        "dim": args.dim,
        "headline_note": (
            "recall@10 against exact float32 search, at each configuration's default nprobe and "
            "rerank candidates (measured per shard at build time, index/ann/tune.py), worst over "
            "the "
            "shard counts; bytes_per_vector_ram = PQ codes + int64 ids as allocated in the "
            "inverted lists (fast-scan blocks included), worst over the shard counts"
        ),
        "queries": args.queries,
        "exact_search_seconds_float32": round(exact_seconds, 2),
        "data": "harness.synthetic.gaussian_mixture(seed=0), 1000 clusters, L2-normalised",
        "configs": rows,
    }
    common.write_and_plot(name, result, plot, headline=True)


def summarise_sizes() -> dict:
    """Gather every ``index_build*.json`` of the full benchmark into one table over N."""
    rows = []
    for path in sorted(common.RESULTS_DIR.glob("index_build*.json")):
        if path.stem in ("index_build_sizes", "index_build_quick"):
            continue
        body = json.loads(path.read_text())
        for r in body.get("configs", []):
            rows.append(
                {
                    "n_vectors": body["n_vectors"],
                    "shards": r["shards"],
                    "factory": r["factory"],
                    "build_wall_seconds": r["build_wall_seconds"],
                    "build_seconds_sum_of_shards": r["build_seconds_sum_of_shards"],
                    "parallel_speedup": round(
                        r["build_seconds_sum_of_shards"] / r["build_wall_seconds"], 2
                    ),
                    "seconds_per_million": round(
                        r["build_wall_seconds"] / body["n_vectors"] * 1e6, 2
                    ),
                    "bytes_per_vector_ram": r["bytes_per_vector_ram"],
                    "bytes_per_vector_disk_version": r["bytes_per_vector_disk_version"],
                    "recall_at_10_rerank": r["recall_at_10_rerank"],
                    "ms_per_query_rerank": r["ms_per_query_rerank"],
                    "source": path.name,
                    "when": body["machine"]["when"],
                }
            )
    rows.sort(key=lambda r: (r["n_vectors"], r["shards"]))
    result = {"configs": rows, "note": "gathered from the index_build*.json files listed"}
    common.write_and_plot("index_build_sizes", result, plot_sizes)
    for r in rows:
        print({k: v for k, v in r.items() if k not in ("source", "when")})
    return result


def plot_sizes(result: dict, path: Path) -> None:
    plt = common.pyplot()
    rows = result["configs"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for shards in sorted({r["shards"] for r in rows}):
        sel = [r for r in rows if r["shards"] == shards]
        ns = [r["n_vectors"] for r in sel]
        ax1.plot(ns, [r["build_wall_seconds"] for r in sel], "o-", label=f"{shards} shards")
        ax2.plot(ns, [r["bytes_per_vector_ram"] for r in sel], "o-", label=f"{shards} shards")
        ax3.plot(ns, [r["parallel_speedup"] for r in sel], "o-", label=f"{shards} shards")
    for ax, label in (
        (ax1, "build wall seconds (Ray tasks)"),
        (ax2, "bytes/vector in RAM (codes + ids)"),
        (ax3, "parallel speedup (sum of shard builds / wall)"),
    ):
        ax.set(xscale="log", xlabel="vectors (N)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_yscale("log")
    ax3.axhline(2, color="k", ls=":", lw=0.8)
    fig.suptitle("index build vs N and shards (256-d Gaussian mixture, 2 cores)", fontsize=10)
    common.save_figure(fig, path)


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    rows = result["configs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    shards, wall = [str(r["shards"]) for r in rows], [r["build_wall_seconds"] for r in rows]
    bars = ax1.bar(shards, wall, label="wall (parallel)")
    summed = [r["build_seconds_sum_of_shards"] for r in rows]
    ax1.plot(shards, summed, "ko--", label="sum of shard builds")
    common.label_bars(
        ax1,
        bars,
        [
            f"{r['bytes_per_vector_ram']:.0f} B/vec RAM\n{r['bytes_per_vector_disk_index']:.0f}"
            " B/vec disk"
            for r in rows
        ],
    )
    ax1.set(ylim=(0, 1.2 * max(wall)), xlabel="shards", ylabel="build seconds")
    ax1.set_title(f"build: {result['n_vectors']:,} x {result['dim']}-d, Ray tasks on 2 cores")
    ax1.legend(fontsize=8)
    for r in rows:
        xs, s = [p["nprobe"] for p in r["curve"]], r["shards"]
        reranked = [p["recall_ivfpq_rerank"] for p in r["curve"]]
        (line,) = ax2.plot(xs, reranked, "o-", label=f"{s} + rr")
        plain = [p["recall_ivfpq"] for p in r["curve"]]
        ax2.plot(xs, plain, "x--", color=line.get_color(), label=f"{s} no rr")
    ax2.set_xscale("log", base=2)
    ax2.set(xlabel="nprobe (per shard)", ylabel="recall@10 vs exact")
    ax2.set_title("recall@10: IVF+PQ (dashed), + exact rerank (solid), by shards")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
