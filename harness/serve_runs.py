"""The real Serve app over HTTP, one Serve mode per fresh process, measured at operating points.

Serve reads its mode flags (``serve.local.SERVE_MODES``) at import and at start, so
``over_http`` runs each mode as ``python -m harness.serve_runs <spec.json>``: a local Ray, the
app over a built store (vector queries only, no image model; the recall canary off), then, after
a warm-up, JSON vector queries from client threads (``closed_loop.HttpClient``) on each entry
(``proxy``: Serve's HTTP port; ``direct_ingress``: the ingress replica's own port, where the mode
has one), either the server's defaults at every concurrency level or each operating point
(``{"label", "body": {nprobe, candidates, filter...}, "concurrency", "requests", "recall"}``).
The child returns the ids each point found; recall is computed here. Ray runs workers at nice 15
(drivers stay responsive); the child runs them at 0, as the in-process baselines run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from harness.closed_loop import HttpClient, run_load
from harness.polling import wait_for
from harness.samplers import CpuSampler
from harness.serving import serving
from harness.synthetic import recall_of_rows
from harness.wrk_load import run_wrk, wrk_path
from pipelines.local_ray import init_local_ray
from serve.config import DeploymentSettings, ServeConfig
from serve.local import SERVE_MODES, direct_ingress_port

ROOT = Path(__file__).resolve().parents[1]
K = 10
ENTRIES = ("proxy", "direct_ingress")
# the server's processes, by a part of their titles (harness.samplers.CpuSampler)
SERVER_ROLES = (
    ("ray::", "server"),
    ("raylet", "server"),
    ("gcs_server", "server"),
    ("ray/", "server"),
    ("haproxy", "server"),
)


def measure_http(
    call: HttpClient, label, concurrency, requests, with_recall, n_queries, wrk_s: float = 0
) -> dict:
    """Latency and QPS at each concurrency level (and the ids found for every query), and the
    CPU the server's processes spent per query (``server_cpu_ms_per_query``: every Ray process
    and HAProxy, summed; this process is the load generator and is left out). With ``wrk_s``
    and ``wrk`` installed, each level again from ``wrk`` for that many seconds (``wrk_<c>``:
    the tail without the Python load generator's own waits, ``harness.wrk_load``; and the
    server's CPU per query under it, over a longer window, with a load generator that takes
    little of the box's CPU: ~0.1 ms a query against the Python client's ~2)."""
    rows = {}
    for c in concurrency:
        call.server_ms.clear()
        with CpuSampler(SERVER_ROLES, "load generator", interval_s=0.5) as cpu:
            stats, _ = run_load(call, requests, c, loadavg=True, errors_ok=True)
        stats["ingress_took_p50_ms"] = round(statistics.median(call.server_ms), 3)
        stats["ingress_took_p99_ms"] = round(float(np.percentile(call.server_ms, 99)), 3)
        stats.update(cpu_per_query(cpu, requests))
        rows[str(c)] = stats
        print(f"HTTP {label} c={c:>2}: {stats}", flush=True)
        if wrk_s and wrk_path():
            bodies = [b.decode() for b in call.bodies[:200]]
            with CpuSampler(SERVER_ROLES, "driver", interval_s=0.5) as cpu:
                loaded = run_wrk(call.url, bodies, c, wrk_s)
            rows[f"wrk_{c}"] = {**loaded, **cpu_per_query(cpu, loaded["requests"])}
            print(f"HTTP {label} c={c:>2} wrk: {rows[f'wrk_{c}']}", flush=True)
    if with_recall:
        _, found = run_load(call, n_queries, 1, errors_ok=True)  # an error: no ids, a miss
        rows["found"] = [found[i] or [] for i in range(n_queries)]
    return rows


def cpu_per_query(cpu: CpuSampler, requests: int) -> dict:
    """The server's CPU ms per query (``server_cpu_ms_per_query``), and by process (the ones
    above 0.1 ms), every process on the machine: the server's, and the load generator's and
    others' that ``server_cpu_ms_per_query`` leaves out."""
    requests = max(1, requests)
    return {
        "server_cpu_ms_per_query": round(1000 * cpu.seconds.get("server", 0) / requests, 3),
        "cpu_ms_per_query_by_process": {
            title: round(1000 * seconds / requests, 3)
            for title, seconds in sorted(cpu.by_title.items(), key=lambda kv: -kv[1])
            if 1000 * seconds / requests >= 0.1
        },
    }


def measure_points(
    url, queries, points: list | None, label: str, concurrency, requests, wrk_s: float = 0
) -> dict:
    """After a warm-up, the defaults at every level (``points`` None) or each point's body;
    ``wrk_s``: the defaults (or a point with ``"wrk": true``) from ``wrk`` too."""
    warm = HttpClient(url, queries)
    run_load(warm, 100, 1, errors_ok=True)  # warm-up: connections, replicas' first calls
    if points is None:
        return measure_http(warm, label, concurrency, requests, True, len(queries), wrk_s)
    out = []
    for point in points:
        rows = measure_http(
            HttpClient(url, queries, point.get("body")),
            f"{label} {point.get('label', '')}",
            point.get("concurrency", concurrency),
            point.get("requests", requests),
            point.get("recall", True),
            len(queries),
            wrk_s if point.get("wrk") else 0,
        )
        out.append({**point, **rows})
    return {"points": out}


def answered(call: HttpClient) -> bool:
    """Whether one query is answered whole (every shard)."""
    try:
        call(0)
    except (httpx.HTTPError, RuntimeError):  # still loading: 503, or partial
        return False
    return True


def worker(spec: dict) -> None:
    """One Serve mode in this (fresh) process; writes what it measured to ``spec["out"]``."""
    workdir = Path(spec["workdir"])
    queries = np.load(workdir / "queries.npy")
    # logical CPUs: room for every searcher replica (0.25 each) next to the ingress
    per_group = spec["shards_per_group"] or spec["shards"]
    replicas = spec["searcher_replicas"] * -(-spec["shards"] // per_group)
    ray = init_local_ray(workdir / "ray", num_cpus=max(4, int(0.25 * replicas + 2)))
    config = ServeConfig(
        store=spec["store"],
        storage_options=spec.get("storage_options"),  # an s3:// store's endpoint and keys
        image_queries=False,
        reload_interval_s=0,
        default_candidates=spec["candidates"],
        default_nprobe=spec["nprobe"],
        shards_per_group=spec["shards_per_group"] or None,
        colocate_shards=spec["colocate"],
        canary_fraction=0,  # the recall canary's background exact searches are not measured here
        searcher=DeploymentSettings(
            num_replicas=spec["searcher_replicas"], num_cpus=0.25, max_ongoing_requests=64
        ),
    )
    try:
        with serving(config) as served:
            out: dict = {"serve_start_s": round(served.start_s, 1), "config": config.to_dict()}
            # serve.run returns when the replicas are up; a query is answered whole once every
            # shard is loaded (downloaded, verified, mapped): the first-query time a user sees
            t0, probe = time.perf_counter(), HttpClient(f"{served.url}/search", queries[:1])
            wait_for(lambda: answered(probe), 600, "a full answer from the new replicas", 0.05)
            out["first_query_s"] = round(served.start_s + time.perf_counter() - t0, 2)
            entries = {"proxy": served.port}
            direct = direct_ingress_port()
            if direct is not None:
                entries["direct_ingress"] = direct
            entries = {e: p for e, p in entries.items() if e in spec["entries"]} or entries
            for entry, port in entries.items():
                url = f"http://127.0.0.1:{port}/search"
                measured = measure_points(
                    url, queries, spec["points"], entry, spec["concurrency"], spec["requests"],
                    spec.get("wrk_s", 0),
                )  # fmt: skip
                out[entry] = {"port": port, **measured}
            out["stats"] = httpx.get(f"{served.url}/stats", timeout=30).json()
            out["processes_rss_mb"] = {
                p.info["name"]: round(p.info["memory_info"].rss / 2**20)
                for p in psutil.process_iter(["name", "memory_info"])
                if p.info["name"] and p.info["name"].startswith("ray::Serve")
            }
    finally:
        ray.shutdown()
    Path(spec["out"]).write_text(json.dumps(out))


def spec_of(args, mode: str, store_uri: str, out: Path) -> dict:
    """What the child needs, from a benchmark's options (``args``: workdir, requests,
    candidates, concurrency, shards; optionally searcher_replicas, shards_per_group, colocate,
    entries, nprobe and points, a list of operating points)."""
    return {
        "mode": mode,
        "store": store_uri,
        "out": str(out),
        "workdir": str(args.workdir),
        "requests": args.requests,
        "candidates": args.candidates,
        "concurrency": args.concurrency,
        "shards": args.shards,
        "searcher_replicas": getattr(args, "searcher_replicas", 1),
        "shards_per_group": getattr(args, "shards_per_group", 0) or 0,
        "colocate": getattr(args, "colocate", False),
        "entries": getattr(args, "entries", list(ENTRIES)),
        "nprobe": getattr(args, "nprobe", None) or None,
        "points": getattr(args, "points", None),
        "wrk_s": getattr(args, "wrk_seconds", 0),
        "storage_options": getattr(args, "storage_options", None),
    }


def run_in_mode(module: str, spec: Path, mode: str) -> None:
    """``python -m <module> <spec>`` in a fresh process with Serve ``mode``'s flags (read at
    import and start) and Ray's workers at nice 0, as the in-process baselines run."""
    env = {**os.environ, **SERVE_MODES[mode], "RAY_worker_niceness": "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    subprocess.run([sys.executable, "-m", module, str(spec)], env=env, check=True)


def over_http(args, store_uri: str, queries: np.ndarray, truth, ids, point_truths=None) -> dict:
    """Run each of ``args.modes`` in its own process; recall from the ids it found (against
    ``point_truths[i]`` for operating point ``i`` when given, e.g. one per filter)."""
    np.save(args.workdir / "queries.npy", queries)
    results = {}
    for mode in args.modes:
        out = args.workdir / f"http-{mode}.json"
        spec = args.workdir / f"http-{mode}-spec.json"
        spec.write_text(json.dumps(spec_of(args, mode, store_uri, out)))
        run_in_mode("harness.serve_runs", spec, mode)
        body = json.loads(out.read_text())
        for entry in ENTRIES:
            points = body[entry].get("points", []) if entry in body else []
            for i, rows in enumerate([body[entry], *points] if entry in body else []):
                if "found" in rows:
                    expected = truth if point_truths is None or i == 0 else point_truths[i - 1]
                    rows["recall_at_10"] = round(
                        recall_of_rows(rows.pop("found"), expected, ids, K), 4
                    )
        results[mode] = body
    return results


if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))
