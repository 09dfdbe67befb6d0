"""Query latency through Serve over HTTP vs the same shards searched in-process.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/query_latency.py

1M x 256 Gaussian-mixture vectors (``harness.synthetic.gaussian_mixture``) in 4 shards, written
as a real store (Parquet parts + manifest) and indexed with ``index.live.rebuild.rebuild_shard``
(the index rules pick the factory; ``harness.synthetic.cached_store``). Queries are held-out
draws of the same mixture. Two ways to ask:

- HTTP: the real Serve app (Ingress -> 4 ShardSearcher deployments; vectors only, no image model
  made these vectors) on 127.0.0.1, JSON vector queries on keep-alive connections from client
  threads in this process (the load generator shares the 2 cores), concurrency 1, 4 and 16, in
  each Serve mode of ``serve/local.py`` (each in a fresh process, ``harness.serve_runs``: Serve
  reads its flags at start):
  ``default`` through the proxy; ``throughput`` (RAY_SERVE_THROUGHPUT_OPTIMIZED=1) through the
  proxy and on the ingress replica's direct-ingress port. ``--headline`` picks the path whose
  concurrency-1 numbers become the top-level keys (default: throughput/direct_ingress).
- in-process: the same 4 ``ShardIndex`` versions loaded here, each query searched shard by shard
  and merged with ``merge_topk``, from 1, 4 and 16 threads. The gap is what Serve costs.

Both use ``--candidates`` (400) per-shard rerank candidates: the index's own default (100) gives
recall@10 0.76 on this data, 400 gives 0.99 for ~1 ms more per query (measured in-process).
recall@10 is measured against exact (brute-force) search of all 1M vectors. The built store and
the ground truth are cached under ``--workdir`` and reused when they match.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness import (
    serve_runs,  # noqa: E402
    synthetic,  # noqa: E402
)
from harness.closed_loop import run_load  # noqa: E402
from pipelines.local_ray import use_local_ray_env  # noqa: E402
from serve.local import SERVE_MODES  # noqa: E402

use_local_ray_env()

K = 10
# Serve modes (serve/local.py): "default" = Serve as installed (HTTP proxy -> ingress replica ->
# shard replicas over Ray actor calls); "throughput" = RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (gRPC
# between replicas, user code on the replica loop, buffered logs), measured both through the
# proxy and on the ingress replica's own direct-ingress port.
MODES = SERVE_MODES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_scale_args(
        p,
        workdir=Path("/tmp/vs-bench-latency"),
        queries_help="distinct held-out queries",
        requests_help="requests per concurrency level",
        quick=None,
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--name", default="query_latency", help="results file name")
    p.add_argument(
        "--candidates", type=int, default=400, help="per-shard rerank candidates (app default)"
    )
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument(
        "--headline",
        default="throughput/direct_ingress",
        help="path whose c=1 numbers are the headline keys (mode/entry, see http_paths)",
    )
    p.add_argument("--searcher-replicas", type=int, default=1, help="replicas per shard group")
    p.add_argument(
        "--shards-per-group", type=int, default=0, help="shards a searcher serves (0: all)"
    )
    p.add_argument("--colocate", action="store_true", help="the ingress searches the shards itself")
    p.add_argument("--nprobe", type=int, default=None, help="server default nprobe (None: index)")
    p.add_argument(
        "--entries",
        nargs="+",
        default=["proxy", "direct_ingress"],
        choices=["proxy", "direct_ingress"],
        help="HTTP entry points to measure (where the mode has them)",
    )
    # operating points (JSON list of {"label", "body": {nprobe, candidates...}, "concurrency",
    # "requests"}): each is measured on one running app; used by peers.py and query_scaling.py
    p.add_argument("--points", help=argparse.SUPPRESS)
    p.add_argument("--http-worker", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def in_process(args, store_uri: str, queries: np.ndarray, truth, ids) -> dict:
    """The same shards loaded here, each query scattered shard by shard and merged."""
    import faiss

    from index.ann.shard_index import ShardIndex
    from index.live.recall import search_all
    from index.storage.store import Store

    faiss.omp_set_num_threads(1)  # as in each Serve searcher replica (search_threads: 1)
    store = Store(store_uri)
    shards = [ShardIndex.load(store, s) for s in range(args.shards)]

    def call(i):
        q = queries[i % len(queries)][None, :]
        return search_all(shards, q, K, candidates=args.candidates)[0]

    out = {
        "spec": {s.shard: s.meta.get("factory") for s in shards},
        "nprobe": shards[0].default_nprobe,
    }
    for _ in range(50):
        call(0)
    for c in args.concurrency:
        out[str(c)], _ = run_load(call, args.requests, c, loadavg=True)
        print(f"in-process c={c:>2}: {out[str(c)]}")
    found = [call(i) for i in range(len(queries))]
    out["recall_at_10"] = round(synthetic.recall_of_rows(found, truth, ids, K), 4)
    return out


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    levels = result["concurrency"]
    http = [(f"HTTP {name}", rows) for name, rows in result["http_paths"].items()]
    series = [("in-process", result["inprocess"]), *http]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(levels))
    width = 0.8 / len(series)
    for j, (name, rows) in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width
        p50 = [rows[str(c)]["p50_ms"] for c in levels]
        p99 = [rows[str(c)]["p99_ms"] for c in levels]
        bars = ax1.bar(x + offset, p99, width, alpha=0.3)
        ax1.bar(x + offset, p50, width, color=bars[0].get_facecolor()[:3], label=name)
        ax2.plot(levels, [rows[str(c)]["qps"] for c in levels], "o-", label=name)
    ax1.axhline(15, color="k", ls=":", lw=0.8)
    ax1.set_xticks(x, [str(c) for c in levels])
    ax1.set_xlabel("concurrency (solid p50, light p99; dotted: 15 ms goal)")
    ax1.set(ylabel="latency (ms)", yscale="log")
    ax1.legend(fontsize=7)
    ax1.set_title(
        f"{result['n_vectors']:,} x {result['dim']} in {result['shards']} shards, k={result['k']}",
        fontsize=9,
    )
    ax2.set(xlabel="concurrency", ylabel="queries / s", yscale="log")
    ax2.set_xscale("log", base=2)
    ax2.legend(fontsize=7)
    ax2.set_title(f"recall@10 vs exact {result['recall_at_10']:.3f}", fontsize=9)
    common.machine_title(fig, "vector queries over HTTP vs in-process", result)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.http_worker:  # one Serve mode, as serve_runs.over_http runs it
        args.points = json.loads(args.points) if args.points else None
        serve_runs.worker(serve_runs.spec_of(args, args.http_worker, args.store, args.out))
        return 0
    common.work_in(args.workdir)
    base, queries = synthetic.base_and_queries(args.n, args.queries, args.dim)
    ids, uris = synthetic.synthetic_rows(args.n)
    build = synthetic.cached_store(args.workdir, base, ids, uris, args.shards, args.memory_budget)
    truth = synthetic.cached_truth(args.workdir, base, queries, K)
    del base
    inproc = in_process(args, build["store"], queries, truth, ids)
    http = serve_runs.over_http(args, build["store"], queries, truth, ids)
    paths = {
        f"{mode}/{entry}": body[entry]
        for mode, body in http.items()
        for entry in serve_runs.ENTRIES
        if entry in body
    }
    head_name = args.headline if args.headline in paths else next(iter(paths))
    head = paths[head_name]
    c1, top = str(args.concurrency[0]), str(max(args.concurrency))
    result = {
        "http_p50_ms": head[c1]["p50_ms"],
        "http_p99_ms": head[c1]["p99_ms"],
        "inprocess_p50_ms": inproc[c1]["p50_ms"],
        f"qps_concurrency_{top}": head[top]["qps"],
        "recall_at_10": head["recall_at_10"],
        "n_vectors": args.n,
        "shards": args.shards,
        "machine": common.machine_info(),
        "headline_path": head_name,
        "dim": args.dim,
        "k": K,
        "candidates_per_shard": args.candidates,
        "concurrency": args.concurrency,
        "serve_overhead_p50_ratio": round(head[c1]["p50_ms"] / inproc[c1]["p50_ms"], 2),
        "goal": {"http_p50_ms": 15, "http_p99_ms": 50, "concurrency": 1},
        "http_paths": paths,
        "inprocess": inproc,
        "build": build,
        "serve": {
            mode: {k: v for k, v in body.items() if k not in serve_runs.ENTRIES}
            for mode, body in http.items()
        },
        "command": common.command("query_latency", argv),
    }
    common.write_and_plot(args.name, result, plot, headline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
