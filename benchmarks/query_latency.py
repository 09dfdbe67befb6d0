"""Query latency through Serve over HTTP vs the same shards searched in-process.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/query_latency.py

1M x 256 Gaussian-mixture vectors (``benchmarks.common.gaussian_mixture``) in 4 shards, written
as a real store (Parquet parts + manifest) and indexed with ``index.live.rebuild.rebuild_shard``
(the
index rules pick the factory). Queries are held-out draws of the same mixture. Two ways to ask:

- HTTP: the real Serve app (Ingress -> 4 ShardSearcher deployments; vectors only, no image model
  made these vectors) on 127.0.0.1, JSON vector queries on keep-alive connections from client
  threads in this process (the load generator shares the 2 cores), concurrency 1, 4 and 16, in
  each Serve mode of ``serve/local.py`` (each in a fresh process: Serve reads its flags at start):
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
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, gaussian_mixture, machine_info, save_figure, write_result  # noqa: E402
from pipelines.local_ray import free_port, init_local_ray, use_local_ray_env  # noqa: E402
from serve.local import SERVE_MODES  # noqa: E402

use_local_ray_env()

MODEL, WEIGHTS = "synthetic-gaussian-mixture", "seed0"
K = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--queries", type=int, default=1000, help="distinct held-out queries")
    p.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vs-bench-latency"))
    p.add_argument("--memory-budget", default="4G")
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


# ---- data, store, ground truth -------------------------------------------------------------------
def make_data(args) -> tuple[np.ndarray, np.ndarray]:
    t = time.perf_counter()
    x = gaussian_mixture(args.n + args.queries, args.dim, seed=0)
    print(f"generated {len(x):,} x {args.dim} vectors in {time.perf_counter() - t:.1f} s")
    return x[: args.n], x[args.n :]


def ids_uris(n: int) -> tuple[list[str], list[str]]:
    from index.rows.sharding import uri_id

    uris = [f"synthetic://gaussian-mixture/{i}" for i in range(n)]
    return [uri_id(u) for u in uris], uris


def build_store(args, base: np.ndarray, ids: list[str], uris: list[str], metadata=None) -> dict:
    """Write and index the store unless a complete one for the same data is already there.
    ``metadata`` (a pyarrow table, one row per vector) is stored as typed metadata columns."""
    from index.live.rebuild import RebuildOptions, rebuild_shard
    from index.rows import schema
    from index.rows.metadata import schema_of_table
    from index.rows.sharding import shards_of
    from index.storage.manifest import Manifest, commit_manifest, load_manifest
    from index.storage.store import Store

    suffix = "" if metadata is None else "-meta"
    store = Store(args.workdir / f"store-{args.n}-{args.dim}-{args.shards}{suffix}")
    manifest = load_manifest(store)
    if manifest and all(s.version is not None for s in manifest.shards.values()):
        if sum(s.count for s in manifest.shards.values()) == args.n:
            print(f"reusing the built store {store.uri}")
            return {"store": store.uri, "reused": True}
    timings: dict = {"store": store.uri, "reused": False}
    t = time.perf_counter()
    shard_of_row = shards_of(ids, args.shards)
    ids_arr, uris_arr = np.asarray(ids, dtype=object), np.asarray(uris, dtype=object)
    for shard in range(args.shards):
        rows = np.flatnonzero(shard_of_row == shard)
        for start in range(0, len(rows), 100_000):  # parts of <= 100k rows, as a job would write
            sel = rows[start : start + 100_000]
            extra = None
            if metadata is not None:
                part = metadata.take(sel)
                extra = {c: part[c].combine_chunks() for c in part.column_names}
            table = schema.embeddings_table(
                list(ids_arr[sel]), list(uris_arr[sel]), base[sel], extra=extra
            )
            name = store.new_part_name(f"{start // 100_000:04d}")
            store.write_parquet(table, f"{store.embeddings_dir(shard)}/{name}")
    columns = {} if metadata is None else schema_of_table(metadata)
    commit_manifest(
        store,
        lambda m: (m or Manifest(MODEL, WEIGHTS, args.dim, args.shards, metric="ip")).with_metadata(
            columns
        ),
    )
    timings["write_parquet_s"] = round(time.perf_counter() - t, 1)
    timings["build_s"] = {}
    for shard in range(args.shards):
        t = time.perf_counter()
        result = rebuild_shard(store, shard, RebuildOptions(memory_budget=args.memory_budget))
        timings["build_s"][shard] = round(time.perf_counter() - t, 1)
        print(f"shard {shard}: {result['count']:,} rows, {timings['build_s'][shard]} s")
    return timings


def ground_truth(args, base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Row numbers of the exact top-K (inner product) of each query, cached."""
    path = args.workdir / f"gt-{args.n}-{args.dim}-{args.queries}.npy"
    if path.exists():
        return np.load(path)
    import faiss

    t = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base)
    _, rows = flat.search(queries, K)
    np.save(path, rows)
    print(f"exact top-{K} of {len(queries)} queries in {time.perf_counter() - t:.1f} s")
    return rows


def recall(found: list[list[str]], truth_rows: np.ndarray, ids: list[str]) -> float:
    hits = sum(
        len(set(f[:K]) & {ids[r] for r in t}) for f, t in zip(found, truth_rows, strict=True)
    )
    return hits / (K * len(found))


# ---- load generation -------------------------------------------------------------------------
def summarise(latencies_s: list[float], wall_s: float) -> dict:
    ms = np.asarray(latencies_s) * 1000
    return {
        "requests": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "qps": round(len(ms) / wall_s, 1),
    }


def run_load(call, n_requests: int, concurrency: int) -> tuple[dict, dict]:
    """``call(i) -> result`` from ``concurrency`` threads, ``n_requests`` in all."""
    latencies: list[float] = []
    results: dict[int, object] = {}
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            out = call(i)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                results[i] = out

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    stats = summarise(latencies, wall)
    stats["client_cpu_s_per_request_ms"] = round((time.process_time() - cpu0) / n_requests * 1e3, 3)
    return stats, results


def in_process(args, store_uri: str, queries: np.ndarray, truth, ids) -> dict:
    import faiss

    from index.ann.shard_index import ShardIndex
    from index.query.merge import merge_topk
    from index.storage.store import Store

    faiss.omp_set_num_threads(1)  # as in each Serve searcher replica (search_threads: 1)
    store = Store(store_uri)
    shards = [ShardIndex.load(store, s) for s in range(args.shards)]

    def call(i):
        q = queries[i % len(queries)][None, :]
        per_shard = [s.search(q, K, candidates=args.candidates)[0] for s in shards]
        return [h.id for h in merge_topk(per_shard, K, "ip")]

    out = {
        "spec": {s.shard: s.meta.get("factory") for s in shards},
        "nprobe": shards[0].default_nprobe,
    }
    for _ in range(50):
        call(0)
    for c in args.concurrency:
        load_before = os.getloadavg()[0]
        stats, results = run_load(call, args.requests, c)
        stats["loadavg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        out[str(c)] = stats
        print(f"in-process c={c:>2}: {stats}")
    found = [call(i) for i in range(len(queries))]
    out["recall_at_10"] = round(recall(found, truth, ids), 4)
    return out


# Serve modes (serve/local.py): "default" = Serve as installed (HTTP proxy -> ingress replica ->
# shard replicas over Ray actor calls); "throughput" = RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (gRPC
# between replicas, user code on the replica loop, buffered logs), measured both through the
# proxy and on the ingress replica's own direct-ingress port.
MODES = SERVE_MODES


def http_worker(args) -> int:
    """One Serve mode in a fresh process (Serve reads its env flags at import and at start)."""
    import httpx
    import psutil
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import DeploymentSettings, ServeConfig
    from serve.local import direct_ingress_port

    queries = np.load(args.workdir / "queries.npy")
    # logical CPUs: room for every searcher replica (0.25 each) next to the ingress
    per_group = args.shards_per_group or args.shards
    replicas = args.searcher_replicas * -(-args.shards // per_group)
    init_local_ray(args.workdir / "ray", num_cpus=max(4, int(0.25 * replicas + 2)))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(
        store=args.store,
        image_queries=False,
        reload_interval_s=0,
        default_candidates=args.candidates,
        default_nprobe=args.nprobe,
        shards_per_group=args.shards_per_group or None,
        colocate_shards=args.colocate,
        canary_fraction=0,  # the recall canary's background exact searches are not measured here
        searcher=DeploymentSettings(
            num_replicas=args.searcher_replicas, num_cpus=0.25, max_ongoing_requests=64
        ),
    )
    t = time.perf_counter()
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    out: dict = {"serve_start_s": round(time.perf_counter() - t, 1), "config": config.to_dict()}
    entries = {"proxy": port}
    direct = direct_ingress_port()
    if direct is not None:
        entries["direct_ingress"] = direct
    entries = {e: p for e, p in entries.items() if e in args.entries} or entries
    points = json.loads(args.points) if args.points else None
    try:
        for entry, entry_port in entries.items():
            url = f"http://127.0.0.1:{entry_port}/search"
            out[entry] = {"port": entry_port, **measure_points(args, url, queries, points, entry)}
        out["stats"] = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=30).json()
        out["processes_rss_mb"] = {
            p.info["name"]: round(p.info["memory_info"].rss / 2**20)
            for p in psutil.process_iter(["name", "memory_info"])
            if p.info["name"] and p.info["name"].startswith("ray::Serve")
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(args.out).write_text(json.dumps(out))
    return 0


class HttpClient:
    """JSON vector queries against one ``/search`` URL on keep-alive connections (one per
    client thread); remembers the server's ``took_ms`` of each answer."""

    def __init__(self, url: str, queries: np.ndarray, extra: dict | None = None):
        self.url = url
        self.bodies = [
            json.dumps({"vector": q.tolist(), "k": K, **(extra or {})}).encode() for q in queries
        ]
        self.local = threading.local()
        self.server_ms: list[float] = []

    def __call__(self, i: int) -> list[str]:
        import httpx

        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = httpx.Client(timeout=30)
        r = client.post(
            self.url,
            content=self.bodies[i % len(self.bodies)],
            headers={"content-type": "application/json"},
        )
        r.raise_for_status()
        body = r.json()
        if body["partial"]:
            raise RuntimeError(f"partial answer: {body['missing_shards']}")
        self.server_ms.append(body["took_ms"])
        return [h["id"] for h in body["results"]]


def measure_http(call: HttpClient, label, concurrency, requests, with_recall, n_queries) -> dict:
    """Latency and QPS at each concurrency level (and the ids found for every query)."""
    rows = {}
    for c in concurrency:
        call.server_ms.clear()
        load_before = os.getloadavg()[0]
        stats, _ = run_load(call, requests, c)
        stats["loadavg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        stats["ingress_took_p50_ms"] = round(statistics.median(call.server_ms), 3)
        rows[str(c)] = stats
        print(f"HTTP {label} c={c:>2}: {stats}", flush=True)
    if with_recall:
        rows["found"] = [call(i) for i in range(n_queries)]
    return rows


def measure_points(args, url: str, queries: np.ndarray, points: list | None, label: str) -> dict:
    """After a warm-up, the defaults at every level (``points`` None) or each point's body."""
    warm = HttpClient(url, queries)
    for i in range(100):  # warm-up: connections, replicas' first calls
        warm(i)
    if points is None:
        return measure_http(warm, label, args.concurrency, args.requests, True, len(queries))
    out = []
    for point in points:
        rows = measure_http(
            HttpClient(url, queries, point.get("body")),
            f"{label} {point.get('label', '')}",
            point.get("concurrency", args.concurrency),
            point.get("requests", args.requests),
            point.get("recall", True),
            len(queries),
        )
        out.append({**point, **rows})
    return {"points": out}


def over_http(args, store_uri: str, queries: np.ndarray, truth, ids, point_truths=None) -> dict:
    """Run each Serve mode in its own process; recall from the ids it found (against
    ``point_truths[i]`` for operating point ``i`` when given, e.g. one per filter)."""
    import subprocess

    np.save(args.workdir / "queries.npy", queries)
    results = {}
    for mode in args.modes:
        out = args.workdir / f"http-{mode}.json"
        cmd = [
            sys.executable,
            __file__,
            "--http-worker",
            mode,
            "--store",
            store_uri,
            "--out",
            str(out),
            "--workdir",
            str(args.workdir),
            "--requests",
            str(args.requests),
            "--candidates",
            str(args.candidates),
            "--concurrency",
            *map(str, args.concurrency),
            "--shards",
            str(args.shards),
            "--searcher-replicas",
            str(getattr(args, "searcher_replicas", 1)),
            "--shards-per-group",
            str(getattr(args, "shards_per_group", 0) or 0),
            *(["--colocate"] if getattr(args, "colocate", False) else []),
            "--entries",
            *getattr(args, "entries", ["proxy", "direct_ingress"]),
        ]
        if getattr(args, "nprobe", None):
            cmd += ["--nprobe", str(args.nprobe)]
        if getattr(args, "points", None):
            cmd += ["--points", args.points]
        # Ray runs workers at nice 15 (drivers stay responsive); the in-process baseline runs at
        # nice 0, so for a fair comparison on a shared box Serve's workers run at 0 too
        env = {**os.environ, **MODES[mode], "RAY_worker_niceness": "0"}
        subprocess.run(cmd, env=env, check=True)
        body = json.loads(out.read_text())
        for entry in ("proxy", "direct_ingress"):
            points = body[entry].get("points", []) if entry in body else []
            for i, rows in enumerate([body[entry], *points] if entry in body else []):
                if "found" in rows:
                    expected = truth if point_truths is None or i == 0 else point_truths[i - 1]
                    rows["recall_at_10"] = round(recall(rows.pop("found"), expected, ids), 4)
        results[mode] = body
    return results


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["concurrency"]
    series = [("in-process", result["inprocess"])] + [
        (f"HTTP {name}", rows) for name, rows in result["http_paths"].items()
    ]
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
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax1.set_title(
        f"{result['n_vectors']:,} x {result['dim']} in {result['shards']} shards, k={result['k']}",
        fontsize=9,
    )
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("queries / s")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.legend(fontsize=7)
    ax2.set_title(f"recall@10 vs exact {result['recall_at_10']:.3f}", fontsize=9)
    m = result["machine"]
    fig.suptitle(
        f"vector queries over HTTP vs in-process, {m['cores']} cores, GPU {m['gpu']}", fontsize=10
    )
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.http_worker:
        return http_worker(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TMPDIR", str(args.workdir))
    base, queries = make_data(args)
    ids, uris = ids_uris(args.n)
    build = build_store(args, base, ids, uris)
    truth = ground_truth(args, base, queries)
    del base
    inproc = in_process(args, build["store"], queries, truth, ids)
    http = over_http(args, build["store"], queries, truth, ids)
    paths = {
        f"{mode}/{entry}": body[entry]
        for mode, body in http.items()
        for entry in ("proxy", "direct_ingress")
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
        "machine": machine_info(),
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
            mode: {k: v for k, v in body.items() if k not in ("proxy", "direct_ingress")}
            for mode, body in http.items()
        },
        "command": "flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/query_latency.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    path = write_result(args.name, result)
    plot(json.loads(path.read_text()), RESULTS_DIR / f"{args.name}.png")
    print(f"\n{'':>30} {'c':>3} {'p50 ms':>8} {'p99 ms':>8} {'QPS':>8} {'recall@10':>9}")
    for name, rows in [("in-process", inproc), *[(f"HTTP {k}", v) for k, v in paths.items()]]:
        for c in args.concurrency:
            r = rows[str(c)]
            print(
                f"{name:>30} {c:>3} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['qps']:8.1f} "
                f"{rows['recall_at_10']:9.4f}"
            )
    print(
        f"headline ({head_name}): p50 {result['http_p50_ms']} ms, p99 {result['http_p99_ms']} ms"
        f" at concurrency {c1}; {result[f'qps_concurrency_{top}']} QPS at {top}"
    )
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
