"""Freshness: query latency before, during and after a background rebuild; add-to-searchable.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/freshness.py            # 1M x 256
    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/freshness.py --quick    # 100k x 256

The store: ``--n`` Gaussian-mixture vectors (``harness.synthetic.gaussian_mixture``) in
``--shards`` shards, the same store ``benchmarks/query_latency.py`` builds and caches in
``/tmp/vs-bench-latency`` (reused when present, else built the same way). Each run works on a
hard-linked copy (``cp -al``: every file of a store is immutable or replaced atomically, so the
cache is never modified), so runs do not accumulate deltas.

The run: the real Serve app over HTTP on 127.0.0.1 (vectors only, as in query_latency; with the
Rebuilder deployment), one client thread querying back to back for the whole run, and one
thread adding rows (``POST /images`` with a JSON vector drawn from the same mixture) at
``--add-interval-s``, each followed by exact-match queries until the new id comes back first:
*add-to-searchable* is from sending the POST to the first query that finds it. Phases:
``--steady-s`` seconds before; then ``POST /admin/rebuild`` (every shard: a Ray task each,
folding the delta in, at ``rebuild_num_cpus`` CPUs, competing with the queries for the same 2
cores) until every shard serves the new version (polled on ``/stats``); then ``--steady-s``
seconds after. A query is failed when it is not a 200 or says ``partial: true``.

Writes ``benchmarks/results/freshness.json`` (headline keys first) and ``freshness.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness.serving import serving  # noqa: E402
from harness.synthetic import cached_store, gaussian_mixture, synthetic_rows  # noqa: E402
from harness.traffic import versions  # noqa: E402
from pipelines.local_ray import init_local_ray, use_local_ray_env  # noqa: E402

use_local_ray_env()

K = 10
LATENCY_CACHE = Path("/tmp/vs-bench-latency")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_scale_args(
        p,
        workdir=Path("/tmp/vs-bench-freshness"),
        queries=None,
        requests=None,
        quick="100k vectors, shorter phases",
    )
    p.add_argument("--steady-s", type=float, default=30.0, help="seconds before and after")
    p.add_argument("--add-interval-s", type=float, default=0.5, help="pause between adds")
    p.add_argument("--candidates", type=int, default=400, help="per-shard rerank candidates")
    p.add_argument("--rebuild-cpus", type=float, default=1.0, help="Ray CPUs per rebuild task")
    p.add_argument("--retrain", action="store_true", help="force retraining (drift_ratio 0)")
    p.add_argument("--name", default="freshness")
    args = p.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 100_000)
        args.steady_s = min(args.steady_s, 15.0)
    return args


# ---- the store -----------------------------------------------------------------------------------
def prepare_store(args) -> tuple[str, dict]:
    """A fresh hard-linked copy of the cached built store (building the cache if needed)."""
    cache = LATENCY_CACHE / f"store-{args.n}-{args.dim}-{args.shards}"
    info: dict = {"source": str(cache)}
    if not (cache / "manifest.json").exists():
        LATENCY_CACHE.mkdir(parents=True, exist_ok=True)
        base = gaussian_mixture(args.n, args.dim, seed=0)
        ids, uris = synthetic_rows(args.n)
        info["built"] = cached_store(
            LATENCY_CACHE, base, ids, uris, args.shards, args.memory_budget
        )
        del base
    run = args.workdir / "store-run"
    shutil.rmtree(run, ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(cache), str(run)], check=True)
    return str(run), info


# ---- load ----------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.queries: list[tuple[float, float, bool]] = []  # (t, ms, ok)
        self.adds: list[dict] = []
        self.failures: list[str] = []


def query_loop(url: str, queries: np.ndarray, rec: Recorder, stop: threading.Event, t0: float):
    import httpx

    bodies = [json.dumps({"vector": q.tolist(), "k": K}).encode() for q in queries]
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        while not stop.is_set():
            start = time.perf_counter()
            ok, why = True, ""
            try:
                r = client.post("/search", content=bodies[i % len(bodies)], headers=headers)
                if r.status_code != 200 or r.json().get("partial"):
                    ok, why = False, f"{r.status_code} {r.text[:200]}"
            except Exception as e:  # every failure counts; the loop goes on
                ok, why = False, f"{type(e).__name__}: {e}"
            ms = (time.perf_counter() - start) * 1000
            with rec.lock:
                rec.queries.append((start - t0, ms, ok))
                if not ok:
                    rec.failures.append(why)
            i += 1


def add_loop(url, vectors, rec: Recorder, stop: threading.Event, t0: float, pause_s: float):
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        for i, vector in enumerate(vectors):
            if stop.is_set():
                return
            row_id = f"fresh-{i:06d}"
            body = {"id": row_id, "vector": vector.tolist()}
            query = json.dumps({"vector": vector.tolist(), "k": 1}).encode()
            start = time.perf_counter()
            r = client.post("/images", json=body)
            acked = time.perf_counter()
            entry = {"t": start - t0, "id": row_id, "status": r.status_code}
            if r.status_code == 201:
                deadline = acked + 30
                while time.perf_counter() < deadline:
                    got = client.post(
                        "/search", content=query, headers={"content-type": "application/json"}
                    )
                    results = got.json().get("results") if got.status_code == 200 else None
                    if results and results[0]["id"] == row_id:
                        now = time.perf_counter()
                        entry.update(
                            post_ms=(acked - start) * 1000,
                            searchable_ms=(now - start) * 1000,
                            after_ack_ms=(now - acked) * 1000,
                        )
                        break
            with rec.lock:
                rec.adds.append(entry)
            stop.wait(pause_s)


def run_benchmark(args, store_uri: str) -> dict:
    import httpx

    from serve.config import DeploymentSettings, ServeConfig

    # held-out draws of the store's mixture (same centres): queries, and the rows to add
    mix = gaussian_mixture(args.n + 2000 + 5000, args.dim, seed=0)[args.n :]
    queries, new_rows = mix[:2000].copy(), mix[2000:].copy()
    del mix
    ray = init_local_ray(args.workdir / "ray", num_cpus=4)
    config = ServeConfig(
        store=store_uri,
        image_queries=False,
        open_writes=True,  # 127.0.0.1 only: the benchmark writes without a key
        default_candidates=args.candidates,
        reload_interval_s=1.0,
        delta_poll_s=0.5,
        rebuild_check_s=0,  # rebuilds on request only: the benchmark decides when
        rebuild_num_cpus=args.rebuild_cpus,
        rebuild_gc_grace_s=10,
        rebuild_drift_ratio=0.0 if args.retrain else 1.5,
        rebuild_memory_budget=args.memory_budget,
        access_log=False,
        searcher=DeploymentSettings(num_cpus=0.25, max_ongoing_requests=64),
    )
    try:
        with serving(config) as served, httpx.Client(base_url=served.url, timeout=60) as client:
            run = rebuild_under_load(args, served.url, client, queries, new_rows)
            rebuilds = client.get("/admin/rebuild").json().get("history", [])
            run |= {"versions_after": versions(client), "rebuilds": rebuilds}
    finally:
        ray.shutdown()
    return {"serve_start_s": round(served.start_s, 1), **run, "config": config.to_dict()}


def rebuild_under_load(args, url: str, client, queries, new_rows) -> dict:
    """Queries and adds from their threads; ``--steady-s``, a rebuild of every shard until
    each serves its new version, ``--steady-s`` again."""
    rec, stop = Recorder(), threading.Event()
    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=query_loop, args=(url, queries, rec, stop, t0), daemon=True),
        threading.Thread(
            target=add_loop, args=(url, new_rows, rec, stop, t0, args.add_interval_s), daemon=True
        ),
    ]
    for th in threads:
        th.start()
    try:
        stop.wait(args.steady_s)
        before = versions(client)
        rebuild_start = time.perf_counter() - t0
        r = client.post("/admin/rebuild")
        assert r.status_code == 202, r.text
        swapped: dict[int, float] = {}
        deadline = time.perf_counter() + 1800
        while len(swapped) < args.shards and time.perf_counter() < deadline:
            for shard, (v, b) in enumerate(zip(versions(client), before, strict=True)):
                if v != b and shard not in swapped:
                    swapped[shard] = time.perf_counter() - t0
            stop.wait(0.25)  # polling pace
        rebuild_end = max(swapped.values()) if swapped else time.perf_counter() - t0
        stop.wait(args.steady_s)
        end = time.perf_counter() - t0
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    return {
        "rebuild_window_s": [round(rebuild_start, 2), round(rebuild_end, 2)],
        "swap_at_s": {str(k): round(v, 2) for k, v in sorted(swapped.items())},
        "end_s": round(end, 2),
        "versions_before": before,
        "recorder": rec,
    }


def pct(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def summarise(run: dict) -> dict:
    rec: Recorder = run.pop("recorder")
    lo, hi = run["rebuild_window_s"]
    phases = {"before": [], "during": [], "after": []}
    for t, ms, ok in rec.queries:
        if ok:
            phases["before" if t < lo else "during" if t <= hi else "after"].append(ms)
    phase_stats = {
        name: {"queries": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)}
        for name, v in phases.items()
    }
    steady = phases["before"] + phases["after"]
    found = [a for a in rec.adds if "searchable_ms" in a]
    during = [a["searchable_ms"] for a in found if lo <= a["t"] <= hi]
    return {
        "failed_queries": len(rec.failures),
        "add_to_searchable_p99_ms": pct([a["searchable_ms"] for a in found], 99),
        "p99_ms_during_rebuild": phase_stats["during"]["p99_ms"],
        "p99_ms_steady": pct(steady, 99),
        "p50_ms_steady": pct(steady, 50),
        "p50_ms_during_rebuild": phase_stats["during"]["p50_ms"],
        "add_to_searchable_p50_ms": pct([a["searchable_ms"] for a in found], 50),
        "add_post_p50_ms": pct([a["post_ms"] for a in found], 50),
        "add_searchable_after_ack_p99_ms": pct([a["after_ack_ms"] for a in found], 99),
        "add_to_searchable_p99_ms_during_rebuild": pct(during, 99),
        "adds": len(rec.adds),
        "adds_acknowledged": sum(a["status"] == 201 for a in rec.adds),
        "adds_not_found": sum(a["status"] == 201 and "searchable_ms" not in a for a in rec.adds),
        "queries": len(rec.queries),
        "phases": phase_stats,
        "failures_sample": rec.failures[:5],
        "timeline": {
            "queries": [(round(t, 3), round(ms, 3), ok) for t, ms, ok in rec.queries],
            "adds": [(round(a["t"], 3), round(a.get("searchable_ms", -1), 3)) for a in rec.adds],
        },
        **run,
    }


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    q = np.array([(t, ms) for t, ms, ok in result["timeline"]["queries"] if ok]).reshape(-1, 2)
    bad = [t for t, _, ok in result["timeline"]["queries"] if not ok]
    adds = np.array([a for a in result["timeline"]["adds"] if a[1] >= 0]).reshape(-1, 2)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    lo, hi = result["rebuild_window_s"]
    for ax in (ax1, ax2):
        ax.axvspan(lo, hi, color="orange", alpha=0.2, label="rebuild (request -> last swap)")
        for t in result["swap_at_s"].values():
            ax.axvline(t, color="orange", lw=0.8)
    ax1.plot(q[:, 0], q[:, 1], ".", ms=2, alpha=0.5, label="query latency")
    for t in bad:
        ax1.axvline(t, color="red", lw=0.5)
    ax1.set(yscale="log", ylabel="query latency (ms)")
    ax1.legend(fontsize=8, loc="upper left")
    ax1.set_title(
        f"{result['n_vectors']:,} x {result['dim']} in {result['shards']} shards: p99 steady "
        f"{result['p99_ms_steady']} ms, during rebuild {result['p99_ms_during_rebuild']} ms, "
        f"failed queries {result['failed_queries']}",
        fontsize=9,
    )
    ax2.plot(adds[:, 0], adds[:, 1], "o", ms=3, color="green", label="add -> searchable")
    ax2.set(yscale="log", ylabel="add to searchable (ms)", xlabel="seconds since start")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.set_title(
        f"add-to-searchable p50 {result['add_to_searchable_p50_ms']} ms, p99 "
        f"{result['add_to_searchable_p99_ms']} ms (POST with a vector, then exact-match queries)",
        fontsize=9,
    )
    common.machine_title(fig, "freshness over HTTP", result)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.work_in(args.workdir)
    t = time.perf_counter()
    store_uri, store_info = prepare_store(args)
    store_info["prepare_s"] = round(time.perf_counter() - t, 1)
    run = run_benchmark(args, store_uri)
    result = summarise(run)
    result = {
        **{k: result.pop(k) for k in list(result)[:4]},
        "n_vectors": args.n,
        "dim": args.dim,
        "shards": args.shards,
        "quick": args.quick,
        "machine": common.machine_info(),
        "store": store_info,
        **result,
        "command": common.command("freshness", argv),
    }
    common.write_and_plot(args.name, result, plot)
    shutil.rmtree(args.workdir / "store-run", ignore_errors=True)
    common.print_headline(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
