"""Peers on the same vectors and queries, in the same run, at equal recall@10.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/peers.py [--quick | --n N]
    (needs the benchmark extra: pip install -e '.[bench]' for lancedb)

Five systems answer the same held-out queries over the same ``gaussian_mixture`` vectors
(256-d, L2-normalised, inner product):

- ours: the real Serve app over HTTP (the default Serve mode: HAProxy on Serve's port) on a store of
  ``--shards`` (4) shards built by ``index.live.rebuild.rebuild_shard`` (the store and the HTTP
  worker are ``harness.synthetic``'s and ``harness.serve_runs``'s, as ``query_latency.py``'s),
  each shard reranking its candidates with its float16 vectors;
- FAISS in-process: ONE index over all N vectors, the single-index architecture of
  clip-retrieval/autofaiss, built with the factory string our policy picks for N
  (``index.ann.policy.choose_index``) by the same ``index.ann.build.build_arrays`` and searched
  with the same float16 rerank (``ShardIndex``): the same algorithm, no scatter-gather, no HTTP;
- the floor of a Python HTTP service (``harness/floor_server.py``): one uvicorn process, no
  Ray, serving the same shards with the same search, rerank and merge code over the same
  ``/search`` contract, measured at ours' knobs (so at the same recall);
- Milvus Lite (``milvus-lite`` gRPC server + ``pymilvus``), HNSW (M=16, efConstruction=200, ef
  swept) and IVF_SQ8 (~sqrt(N) lists, nprobe swept), as users meet it: its defaults otherwise,
  inserts in batches of 10,000 rows (``harness.milvus_lite``); ``--milvus-n`` can cap the rows
  it gets when a full build takes too long on this box (said in the JSON);
- LanceDB (embedded) IVF_PQ with the same code size (64 sub-vectors x 8 bits = 64 B/vector at
  256-d, as ours: 128 x 4 bits) and ~sqrt(N) partitions (LanceDB's documented default), metric
  L2 (same order as inner product on unit vectors; its "dot" index ranked worse, see
  ``harness/lance_table.py``), its ``refine_factor`` rescoring candidates with the stored
  float32 vectors.

Each system's knobs (nprobe x rerank candidates / refine factor) are swept on ``--tune-queries``
single-query searches; the cheapest point (lowest p50) reaching ``--target-recall`` is the
equal-recall operating point, measured again on every query: p50/p99 at concurrency 1 and QPS at
concurrency 16 (client threads in this process; the load generator shares the 2 cores with the
server). Ground truth: exact float32 search (``IndexFlatIP``) of all N vectors, computed once.

``--phase build`` builds (and caches under ``--workdir``) the systems (``peer_systems.py``);
``--phase measure`` measures them; the default does both. Writes benchmarks/results/peers.json
(headline keys at top level) and peers.png (recall@10 vs p99 latency, and QPS at the operating
point).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from benchmarks import peer_systems as systems  # noqa: E402
from harness import (
    milvus_lite,  # noqa: E402
    serve_floor,  # noqa: E402
    synthetic,  # noqa: E402
)
from harness.closed_loop import run_load  # noqa: E402
from harness.polling import free_port, wait_for  # noqa: E402
from harness.serve_runs import measure_points, over_http  # noqa: E402
from serve.local import DEFAULT_MODE  # noqa: E402

K = 10
ROOT = Path(__file__).resolve().parents[1]
OURS_GRID = {"nprobe": (4, 8, 16, 32, 64), "candidates": (20, 30, 50, 100, 200, 400)}  # per shard
SINGLE_GRID = {"nprobe": (8, 16, 32, 64, 128), "candidates": (50, 75, 100, 200, 400, 800)}
LANCE_GRID = {"nprobe": (4, 8, 16, 32, 64), "refine_factor": (0, 3, 5, 8, 10, 20)}
GRIDS = {"ours_inprocess": OURS_GRID, "faiss_inprocess": SINGLE_GRID, "lancedb": LANCE_GRID}
MILVUS_GRIDS = {
    "HNSW": {"ef": (16, 32, 64, 128, 256), "unused": (0,)},
    "IVF_SQ8": {"nprobe": (8, 16, 32, 64, 128), "unused": (0,)},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_scale_args(
        p,
        workdir=Path("/tmp/vs-bench-scale"),
        queries=1000,
        queries_help="held-out queries (ground truth)",
    )
    p.add_argument("--tune-queries", type=int, default=200, help="single queries per grid point")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--phase", choices=("build", "measure", "all"), default="all")
    p.add_argument("--milvus-n", type=int, default=0, help="rows Milvus Lite gets (0: all N)")
    p.add_argument(
        "--skip-milvus",
        action="store_true",
        help="no Milvus Lite in this run: its figures are carried from the last results of the "
        "same N and dim, marked with that run's date (they do not depend on this project's code)",
    )
    p.add_argument("--name", default="peers")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.requests, args.tune_queries = min(args.n, 100_000), 300, 100
    # what harness.serve_runs reads from args
    # Serve's own port in the default mode: what a user gets (the throughput mode's direct
    # ingress port measured within 5 % of it, serve/local.py, but the headline is the port's)
    args.candidates, args.modes, args.entries = 400, [DEFAULT_MODE], ["proxy"]
    return args


# ---- measuring -----------------------------------------------------------------------------------
def sweep(name, search, grid: dict, queries, truth, ids, args) -> list[dict]:
    """Every grid point on ``--tune-queries`` single queries: recall@10, p50/p99 (c=1)."""
    (knob_a, values_a), (knob_b, values_b) = grid.items()
    subset = slice(0, args.tune_queries)
    points = []
    for a in values_a:
        for b in values_b:
            for i in range(5):  # warm caches
                search(queries[i], a, b)
            stats, found = run_load(
                lambda i, a=a, b=b: search(queries[i], a, b), args.tune_queries, 1
            )
            found = [found[i] for i in range(args.tune_queries)]
            point = {knob_a: a, knob_b: b, **stats}
            point["recall_at_10"] = round(synthetic.recall_of_rows(found, truth[subset], ids, K), 4)
            points.append(point)
        print(f"{name}: {points[-len(values_b) :]}", flush=True)
    return points


def operating_point(points: list[dict], target: float) -> dict:
    """The lowest-p50 point reaching ``target`` (else the most accurate one)."""
    ok = [p for p in points if p["recall_at_10"] >= target]
    if not ok:
        return max(points, key=lambda p: (p["recall_at_10"], -p["p50_ms"]))
    return min(ok, key=lambda p: p["p50_ms"])


def measure_point(search, point: dict, knobs, queries, truth, ids, args) -> dict:
    """The operating point on every query: recall, then each concurrency level."""
    a, b = (point[k] for k in knobs)
    n = len(queries)
    out = {k: point[k] for k in knobs}
    found = [search(q, a, b) for q in queries]
    out["recall_at_10"] = round(synthetic.recall_of_rows(found, truth, ids, K), 4)
    for c in args.concurrency:
        call = lambda i: search(queries[i % n], a, b)  # noqa: E731
        out[str(c)], _ = run_load(call, args.requests, c, loadavg=True)
    return out


def sweep_and_choose(name, search, grid, queries, truth, ids, args, **extra) -> dict:
    """The grid, its Pareto frontier and the operating point measured on every query."""
    points = sweep(name, search, grid, queries, truth, ids, args)
    chosen = operating_point(points, args.target_recall)
    out = {
        **extra,
        "grid": points,
        "frontier": common.pareto(points, "p50_ms", "recall_at_10"),
        "operating_point": measure_point(search, chosen, grid, queries, truth, ids, args),
    }
    print(f"{name} operating point: {out['operating_point']}", flush=True)
    return out


def http_points(args, frontier: list[dict], chosen: dict) -> list[dict]:
    """Ours over HTTP: the in-process frontier at c=1, then the chosen point at every level."""
    pts = [
        {
            "label": f"nprobe={p['nprobe']} candidates={p['candidates']}",
            "body": {"nprobe": p["nprobe"], "candidates": p["candidates"]},
            "concurrency": [1],
            "requests": args.tune_queries,
        }
        for p in frontier
    ]
    step = max(1, len(pts) // 4)  # at most ~5 frontier points: each costs a pass over the queries
    pts = pts[::step]
    pts.append(
        {
            "label": "operating point",
            "body": {"nprobe": chosen["nprobe"], "candidates": chosen["candidates"]},
            "concurrency": args.concurrency,
            "requests": args.requests,
        }
    )
    return pts


def measure_all(args, build: dict, queries, truth, ids) -> dict:
    import faiss

    faiss.omp_set_num_threads(1)  # one query, one thread: as each Serve searcher replica
    store_uri = build["ours"]["store"]
    searchers = systems.in_process_searchers(args, store_uri, ids)
    out: dict = {}
    for name in GRIDS:
        out[name] = sweep_and_choose(
            name, searchers.pop(name), GRIDS[name], queries, truth, ids, args
        )
    # ours over HTTP at the in-process frontier and at our operating point
    ours = out["ours_inprocess"]
    near = [p for p in ours["frontier"] if p["recall_at_10"] >= args.target_recall - 0.15]
    args.points = http_points(args, near, ours["operating_point"])
    http = over_http(args, store_uri, queries, truth, ids)[DEFAULT_MODE]
    measured = http["proxy"]["points"]
    out["ours_http"] = {
        "frontier": measured[:-1],
        "operating_point": measured[-1],
        "serve": {k: v for k, v in http.items() if k not in ("proxy", "direct_ingress")},
    }
    # the same app with the shard groups inside the ingress replica (colocate_shards)
    args.colocate = True
    colocated = over_http(args, store_uri, queries, truth, ids)[DEFAULT_MODE]
    args.colocate = False
    measured = colocated["proxy"]["points"]
    out["ours_http_colocated"] = {"frontier": measured[:-1], "operating_point": measured[-1]}
    out["floor_http"] = measure_floor(args, store_uri, queries, truth, ids)
    if not args.skip_milvus:
        out.update(measure_milvus(args, queries, truth, ids))
    return out


def measure_floor(args, store_uri: str, queries, truth, ids) -> dict:
    """The uvicorn floor at ours' HTTP points (same knobs, same code: the same recall)."""
    import subprocess

    import httpx

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "harness.floor_server", "--store", store_uri, "--port", str(port)],
        cwd=ROOT,
    )

    def up() -> bool:
        if server.poll() is not None:
            raise RuntimeError("the floor server did not start")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 300, "the floor server's /healthz", interval_s=0.5)
        url = f"http://127.0.0.1:{port}/search"
        measured = measure_points(
            url, queries, args.points, "floor", args.concurrency, args.requests
        )
    finally:
        server.terminate()
        server.wait(30)
    for rows in measured["points"]:
        if "found" in rows:
            rows["recall_at_10"] = round(
                synthetic.recall_of_rows(rows.pop("found"), truth, ids, K), 4
            )
    return {"frontier": measured["points"][:-1], "operating_point": measured["points"][-1]}


def measure_milvus(args, queries, truth, ids) -> dict:
    """Milvus Lite's two indexes: sweep, operating point, as for the in-process systems."""
    n = systems.milvus_rows(args)
    if n < args.n:  # a capped collection: its own exact truth over its rows
        base, _ = synthetic.base_and_queries(args.n, 0, args.dim)
        truth = synthetic.exact_topk(base[:n], queries, K)
        del base
    server = milvus_lite.MilvusLite(args.workdir / "milvus-lite")
    out = {}
    try:
        built = json.loads(systems.build_path(args).read_text())["milvus_lite"]["by_index"]
        for itype, grid in MILVUS_GRIDS.items():
            collection = built[itype]["collection"]
            server.client.load_collection(collection)  # a restarted server
            search = milvus_lite.searcher(server.client, collection, next(iter(grid)), ids, K)
            name = f"milvus_lite_{itype.lower()}"
            out[name] = sweep_and_choose(name, search, grid, queries, truth, ids, args, rows=n)
    finally:
        server.close()
    return out


def carried_milvus(args) -> dict:
    """The last results' Milvus Lite systems (same N and dim) and when they were measured."""
    path = common.RESULTS_DIR / f"{args.name}.json"
    if not path.exists():
        return {}
    last = json.loads(path.read_text())
    if (last.get("n_vectors"), last.get("dim")) != (args.n, args.dim):
        return {}
    systems_ = {k: v for k, v in last.get("systems", {}).items() if k.startswith("milvus_lite_")}
    when = last.get("milvus_carried_from") or last.get("machine", {}).get("when")
    return {"systems": systems_, "when": when} if systems_ else {}


def best_milvus(result: dict) -> str | None:
    """The Milvus Lite index with the lowest p99 among those reaching the target recall (else
    the most accurate one)."""
    names = [k for k in result if k.startswith("milvus_lite_")]
    if not names:
        return None
    c1 = str(result["concurrency"][0])
    ok = [
        n for n in names if result[n]["operating_point"]["recall_at_10"] >= result["target_recall"]
    ]
    if ok:
        return min(ok, key=lambda n: result[n]["operating_point"][c1]["p99_ms"])
    return max(names, key=lambda n: result[n]["operating_point"]["recall_at_10"])


def headline(result: dict) -> dict:
    ours, faiss_, lance = (
        result[k]["operating_point"] for k in ("ours_http", "faiss_inprocess", "lancedb")
    )
    inproc, floor = (result[k]["operating_point"] for k in ("ours_inprocess", "floor_http"))
    colocated = result["ours_http_colocated"]["operating_point"]
    c1, top = str(result["concurrency"][0]), str(max(result["concurrency"]))
    milvus_name = best_milvus(result)
    milvus = result[milvus_name]["operating_point"] if milvus_name else None
    extra = {
        "floor_http_p50_ms": floor[c1]["p50_ms"],
        "floor_http_p99_ms": floor[c1]["p99_ms"],
        "floor_http_qps": floor[top]["qps"],
        "floor_recall_at_10": floor["recall_at_10"],
        "ours_qps_over_inprocess_shards": round(ours[top]["qps"] / inproc[top]["qps"], 3),
        "ours_qps_over_floor": round(ours[top]["qps"] / floor[top]["qps"], 3),
        "ours_p50_over_floor": round(ours[c1]["p50_ms"] / floor[c1]["p50_ms"], 3),
        "ours_colocated_http_p50_ms": colocated[c1]["p50_ms"],
        "ours_colocated_http_p99_ms": colocated[c1]["p99_ms"],
        "ours_colocated_qps": colocated[top]["qps"],
        "ours_colocated_p50_over_floor": round(colocated[c1]["p50_ms"] / floor[c1]["p50_ms"], 3),
        "ours_colocated_qps_over_inprocess_shards": round(
            colocated[top]["qps"] / inproc[top]["qps"], 3
        ),
    }
    if milvus is not None:
        extra.update(
            milvus_lite_index=milvus_name.removeprefix("milvus_lite_").upper(),
            milvus_lite_rows=result[milvus_name]["rows"],
            milvus_lite_p50_ms=milvus[c1]["p50_ms"],
            milvus_lite_p99_ms=milvus[c1]["p99_ms"],
            milvus_lite_qps=milvus[top]["qps"],
            milvus_lite_recall_at_10=milvus["recall_at_10"],
        )
    return {
        **extra,
        "recall_at_10": min(p["recall_at_10"] for p in (ours, faiss_, lance)),
        "ours_http_p99_ms": ours[c1]["p99_ms"],
        "faiss_inprocess_p99_ms": faiss_[c1]["p99_ms"],
        "lancedb_p99_ms": lance[c1]["p99_ms"],
        "ours_qps": ours[top]["qps"],
        "lancedb_qps": lance[top]["qps"],
        "faiss_inprocess_qps": faiss_[top]["qps"],
        "ours_http_p50_ms": ours[c1]["p50_ms"],
        "faiss_inprocess_p50_ms": faiss_[c1]["p50_ms"],
        "lancedb_p50_ms": lance[c1]["p50_ms"],
        "recall_at_10_each": {
            "ours_http": ours["recall_at_10"],
            "faiss_inprocess": faiss_["recall_at_10"],
            "lancedb": lance["recall_at_10"],
        },
        "ours_http_p99_over_faiss": round(ours[c1]["p99_ms"] / faiss_[c1]["p99_ms"], 2),
        "goal": {
            "ours_qps_at_least_half_inprocess_shards": ours[top]["qps"] >= 0.5 * inproc[top]["qps"],
            "ours_qps_at_least_floor": ours[top]["qps"] >= floor[top]["qps"],
            "ours_p50_within_1_5x_floor": ours[c1]["p50_ms"] <= 1.5 * floor[c1]["p50_ms"],
            "ours_colocated_p50_within_1_5x_floor": colocated[c1]["p50_ms"]
            <= 1.5 * floor[c1]["p50_ms"],
            "ours_colocated_qps_at_least_floor": colocated[top]["qps"] >= floor[top]["qps"],
            "ours_http_p99_within_2x_faiss": ours[c1]["p99_ms"] <= 2 * faiss_[c1]["p99_ms"],
            "ours_p99_below_lancedb": ours[c1]["p99_ms"] < lance[c1]["p99_ms"],
            "ours_qps_above_lancedb": ours[top]["qps"] > lance[top]["qps"],
        },
    }


COLOURS = {
    "ours_http": "C0",
    "ours_inprocess": "C9",
    "ours_http_colocated": "C8",
    "floor_http": "C1",
    "faiss_inprocess": "C2",
    "lancedb": "C3",
    "milvus_lite_hnsw": "C4",
    "milvus_lite_ivf_sq8": "C5",
}
# measured by harness.serve_runs.measure_points: rows per level
HTTP_SYSTEMS = ("ours_http", "ours_http_colocated", "floor_http")


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    c1, top = str(result["concurrency"][0]), str(max(result["concurrency"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, colour in COLOURS.items():
        body = result["systems"].get(name)
        if body is None:
            continue
        front = sorted(body["frontier"], key=lambda p: p["recall_at_10"])
        key = c1 if name in HTTP_SYSTEMS else "p99_ms"
        p99 = [p[key]["p99_ms"] if name in HTTP_SYSTEMS else p[key] for p in front]
        ax1.plot([p["recall_at_10"] for p in front], p99, "o-", color=colour, alpha=0.6, label=name)
        op = body["operating_point"]
        ax1.plot(op["recall_at_10"], op[c1]["p99_ms"], "*", color=colour, ms=16, mec="k")
    ax1.axvline(result["target_recall"], color="k", ls=":", lw=0.8)
    ax1.set(yscale="log", ylabel="p99 latency at concurrency 1 (ms)")
    ax1.set_xlabel(f"recall@10 vs exact (stars: operating points, {result['requests']} requests)")
    ax1.set_title(f"{result['n_vectors']:,} x {result['dim']}: frontier over each system's knobs")
    ax1.legend(fontsize=8)
    milvus = result.get("milvus_lite_index")
    names = ["ours_http", "ours_http_colocated", "floor_http", "faiss_inprocess", "lancedb"]
    names += [f"milvus_lite_{milvus.lower()}"] if milvus else []
    qps = [result["systems"][n]["operating_point"][top]["qps"] for n in names]
    bars = ax2.bar(names, qps, color=[COLOURS[n] for n in names])
    builds = result["build_seconds"]
    built = [f"\nbuild {builds[n]:.0f} s" if builds.get(n) else "" for n in names]
    common.label_bars(ax2, bars, [f"{q:.0f} QPS{b}" for q, b in zip(qps, built, strict=True)])
    ax2.set(ylim=(0, 1.3 * max(qps)), ylabel=f"queries / s at concurrency {top}")
    ax2.set_title(f"at equal recall@10 >= {result['target_recall']} (measured on every query)")
    common.machine_title(fig, "peers on the same vectors", result)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.work_in(args.workdir)
    base, queries = synthetic.base_and_queries(args.n, args.queries, args.dim)
    ids, uris = synthetic.synthetic_rows(args.n)
    build = systems.build_all(args, base, ids, uris)
    truth = synthetic.cached_truth(args.workdir, base, queries, K)
    del base
    if args.phase == "build":
        print(json.dumps(build, indent=1))
        return 0
    measured = measure_all(args, build, queries, truth, ids)
    carried = carried_milvus(args) if args.skip_milvus else {}
    measured.update(carried.get("systems", {}))
    ours_build = build["ours"].get("build_s", {})
    result = {
        "n_vectors": args.n,
        "dim": args.dim,
        "k": K,
        "shards": args.shards,
        "target_recall": args.target_recall,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "tune_queries": args.tune_queries,
        "machine": common.machine_info(),
        "build_seconds": {
            # ours: the shards built one after another in one process (index_build.json has
            # the Ray-parallel wall); FAISS single: build_arrays wall; LanceDB: create_index
            "ours_http": round(sum(ours_build.values()), 1) if ours_build else None,
            "faiss_inprocess": build["faiss_single"]["wall_seconds"],
            "lancedb": build["lancedb"]["index_seconds"],
        },
        "build": build,
        "systems": measured,
        "notes": [
            f"ours: Serve's port in the default mode ({DEFAULT_MODE}), JSON vector queries; "
            "each shard reranks its candidates with float16 vectors; knobs per shard",
            "faiss_inprocess: one index over all N, our policy's factory for N, same float16 "
            "rerank (ShardIndex), 1 OpenMP thread per query, client threads for concurrency",
            "lancedb: embedded, IVF_PQ 8-bit codes of the same size, metric l2 (its dot index "
            "ranked worse on these unit vectors), refine_factor rescoring with float32 vectors; "
            "LanceDB uses its own thread pool",
            "operating point: lowest p50 reaching target_recall on the first tune_queries "
            "queries; its recall here is re-measured on all queries",
        ],
        "command": common.command("peers", argv),
    }
    if carried:
        result["milvus_carried_from"] = carried["when"]
        result["notes"].append(
            f"milvus_lite_*: carried from the run of {carried['when']} (--skip-milvus); every "
            "other system was measured in this run"
        )
    result = {**headline({**result, **measured}), **result}
    floor = serve_floor.measure_floor(args.workdir / "serve-floor", args.dim)
    if floor:  # Serve's own cost of a query on this box, measured in this run (wrk installed)
        result.update(serve_floor=floor, serve_noop_http_p50_ms=floor["1"]["p50_ms"])
        result["notes"].append(
            "serve_noop_http_p50_ms: a no-op app of our app's shape in the same Serve mode "
            "(harness.serve_floor: HAProxy, an ingress, one gRPC call to a deployment that "
            "answers ten fixed hits), wrk at c=1: what any answer through Serve costs here"
        )
    common.write_and_plot(args.name, result, plot)
    print(json.dumps({k: v for k, v in result.items() if k not in ("systems", "build")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
