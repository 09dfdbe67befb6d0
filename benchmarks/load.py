"""A fixed-rate load run against the real Serve app: errors, tail latency, replica memory.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/load.py            # 2 minutes
    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/load.py --quick    # 20 seconds

The app is the full graph (Ingress -> QueryEmbedder + ShardSearcher0..S-1) over a store of real
Caltech-101 photos (embedded in-process, cached under ``--workdir``), served on 127.0.0.1 by a
local Ray started here. The load is *open loop*: request ``i`` is sent at ``t0 + i / rate``
whether or not earlier ones have answered (a closed loop would slow down with the server and hide
queueing), from one asyncio httpx client, bounded by ``--max-in-flight`` (a request that would
pass it is counted as ``dropped`` instead of sent). The mix: ``--image-ratio`` of the requests
upload a catalogue photo (embedded by the QueryEmbedder), the rest send a catalogue vector; every
answer must be a full (non-partial) 200 whose top-1 is the query's own photo.

Early in the run (``--barrage-at-s``, inside the warm-up), the bad-input table
(``harness/bad_inputs.py``, the same one the test suite uses) is fired once from a thread, so 4xx
handling is exercised under load and any 5xx it caused is counted. Replica identity (actor id +
pid of every Serve actor) is compared before and after.

Memory: every ``--sample-s`` seconds the RSS of every Serve actor process (replicas, controller,
proxy; pids from the GCS actor table) is read with psutil. ``rss_growth_mb`` is, over all those
processes, the largest (last sample - first sample after warm-up) in MiB; warm-up is the first
``--warmup-s`` seconds (model, allocator and caches settle). ``rss_slope_mb_per_min`` is the
least-squares slope of each process's post-warm-up samples, for context.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from pipelines.local_ray import init_local_ray, use_local_ray_env  # noqa: E402

use_local_ray_env()

from benchmarks import common  # noqa: E402
from harness import bad_inputs  # noqa: E402
from harness.serve_app import make_store, replica_identity, running_app, serve_replicas  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (open loop)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    p.add_argument("--quick", action="store_true", help="20 s instead of --duration")
    p.add_argument("--image-ratio", type=float, default=0.25, help="share of image uploads")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--classes", type=int, default=10, help="Caltech classes in the store")
    p.add_argument("--per-class", type=int, default=10, help="photos per class in the store")
    p.add_argument("--warmup-s", type=float, default=30.0, help="RSS baseline taken after this")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling period")
    p.add_argument("--max-in-flight", type=int, default=200)
    p.add_argument("--timeout-s", type=float, default=30.0, help="client timeout per request")
    p.add_argument("--no-barrage", action="store_true", help="skip the bad-input barrage")
    p.add_argument(
        "--barrage-at-s",
        type=float,
        default=5.0,
        help="when the bad-input barrage starts (inside warm-up: its big bodies raise the "
        "allocators' high-water marks once, which is not growth)",
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vs-bench-load"))
    p.add_argument("--caltech", type=Path, default=common.CALTECH)
    p.add_argument("--name", default="load", help="results file name")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 20.0
        args.warmup_s = min(args.warmup_s, 5.0)
        args.name = args.name if args.name != "load" else "load_quick"
    if not 0 <= args.image_ratio <= 1 or args.rate <= 0 or args.duration <= 0:
        p.error("need 0 <= --image-ratio <= 1, --rate > 0, --duration > 0")
    return args


# ---- memory sampling ----------------------------------------------------------------------------
class RssSampler(threading.Thread):
    """RSS (MiB) of every Serve actor process every ``period_s``: {actor key: [(t, mib)]}."""

    def __init__(self, period_s: float, t0: float):
        super().__init__(daemon=True, name="rss")
        self.period_s, self.t0 = period_s, t0
        self.series: dict[str, list[tuple[float, float]]] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        now = time.perf_counter() - self.t0
        for row in serve_replicas(include_system=True):
            key = f"{row['deployment']} pid {row['pid']}"
            try:
                rss = psutil.Process(row["pid"]).memory_info().rss / 2**20
            except psutil.Error:
                continue
            self.series.setdefault(key, []).append((round(now, 2), round(rss, 2)))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        self.sample()  # one last point at the very end


def rss_summary(series: dict[str, list[tuple[float, float]]], warmup_s: float) -> dict:
    out = {}
    for key, points in series.items():
        after = [(t, m) for t, m in points if t >= warmup_s]
        if len(after) < 2:
            continue
        ts, ms = np.array([t for t, _ in after]), np.array([m for _, m in after])
        slope = float(np.polyfit(ts, ms, 1)[0]) * 60 if len(after) >= 3 else 0.0
        out[key] = {
            "first_mb": float(ms[0]),
            "last_mb": float(ms[-1]),
            "max_mb": float(ms.max()),
            "growth_mb": round(float(ms[-1] - ms[0]), 2),
            "slope_mb_per_min": round(slope, 3),
            "samples": len(after),
        }
    return out


# ---- the load ----------------------------------------------------------------------------------
async def run_load(app, args, t0: float, barrage_box: dict) -> list[dict]:
    import httpx

    paths = app.paths
    photos = [(p.resolve().as_uri(), p.read_bytes()) for p in paths]
    uris = list(app.vectors)
    vectors = {u: [float(x) for x in app.vectors[u]] for u in uris}
    rng = np.random.default_rng(0)
    n = int(args.rate * args.duration)
    kinds = np.where(rng.random(n) < args.image_ratio, "image", "vector")
    picks = rng.integers(0, 1 << 30, n)
    records: list[dict] = []
    in_flight = 0
    limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=64)

    async with httpx.AsyncClient(
        base_url=app.base_url, timeout=args.timeout_s, limits=limits
    ) as client:

        async def one(i: int, due: float) -> None:
            nonlocal in_flight
            kind = str(kinds[i])
            if kind == "image":
                uri, data = photos[picks[i] % len(photos)]
                request = {"files": {"file": ("q.jpg", data, "image/jpeg")}, "params": {"k": 5}}
            else:
                uri = uris[picks[i] % len(uris)]
                request = {"json": {"vector": vectors[uri], "k": 5}}
            rec = {"i": i, "kind": kind, "t": round(due, 4), "status": None, "ok": False}
            start = time.perf_counter()
            try:
                r = await client.post("/search", **request)
                rec["status"] = r.status_code
                if r.status_code == 200:
                    body = r.json()
                    rec["ok"] = not body["partial"] and body["results"][0]["uri"] == uri
                    if not rec["ok"]:
                        rec["error"] = f"partial={body['partial']} top1={body['results'][0]['uri']}"
                else:
                    rec["error"] = r.text[:200]
            except httpx.HTTPError as e:
                rec["error"] = f"{type(e).__name__}: {e}"[:200]
            rec["latency_ms"] = round((time.perf_counter() - start) * 1000, 3)
            rec["lag_ms"] = round((start - t0 - due) * 1000, 3)  # client-side scheduling lag
            records.append(rec)
            in_flight -= 1

        tasks = []
        barrage_at = min(args.barrage_at_s, args.duration / 2)
        for i in range(n):
            due = i / args.rate
            delay = t0 + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the open-loop schedule itself
            if not args.no_barrage and "thread" not in barrage_box and due >= barrage_at:
                barrage_box["thread"] = threading.Thread(
                    target=run_barrage, args=(app, barrage_box, t0), daemon=True
                )
                barrage_box["thread"].start()
            if in_flight >= args.max_in_flight:
                records.append({"i": i, "kind": str(kinds[i]), "t": due, "dropped": True})
                continue
            in_flight += 1
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
    return records


def run_barrage(app, box: dict, t0: float) -> None:
    """Every bad-input kind once, from a thread, while the load runs."""
    first = app.paths[0]
    ctx = bad_inputs.context_from(
        len(app.vectors[first.resolve().as_uri()]),
        first.read_bytes(),
        app.vectors[first.resolve().as_uri()],
        app.config,
    )
    box["started_s"] = round(time.perf_counter() - t0, 2)
    with app.client(60) as client:
        box["outcomes"] = [bad_inputs.send(client, case, ctx) for case in bad_inputs.CASES]
    box["ended_s"] = round(time.perf_counter() - t0, 2)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 90, 99)} | {
        "max_ms": round(float(a.max()), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def plot(path: Path, records: list[dict], series: dict, summary: dict, args) -> None:
    plt = common.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for kind, colour in (("vector", "tab:blue"), ("image", "tab:orange")):
        pts = [
            (r["t"], r["latency_ms"])
            for r in records
            if r.get("kind") == kind and "latency_ms" in r
        ]
        if pts:
            t, lat = zip(*pts, strict=True)
            top.scatter(t, lat, s=4, alpha=0.5, color=colour, label=f"{kind} queries")
    bad = [(r["t"], r["latency_ms"]) for r in records if "latency_ms" in r and not r["ok"]]
    if bad:
        top.scatter(*zip(*bad, strict=True), s=14, color="red", marker="x", label="errors")
    top.axhline(summary["p99_ms"], color="grey", ls="--", lw=1, label=f"p99 {summary['p99_ms']} ms")
    if summary.get("barrage_window_s"):
        top.axvspan(
            *summary["barrage_window_s"], color="red", alpha=0.08, label="bad-input barrage"
        )
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.set_title(
        f"{summary['requests']} requests at {args.rate:g}/s for {args.duration:g} s "
        f"({args.image_ratio:.0%} image uploads): {summary['errors_5xx']} 5xx, "
        f"{summary['errors']} errors"
    )
    top.legend(loc="upper right", fontsize=8)
    for key, points in sorted(series.items()):
        t, m = zip(*points, strict=True)
        bottom.plot(t, m, lw=1.2, label=key)
    bottom.axvline(args.warmup_s, color="grey", ls=":", lw=1, label="end of warm-up")
    bottom.set_xlabel("seconds since the load started")
    bottom.set_ylabel("RSS (MiB)")
    bottom.set_title(
        f"RSS of every Serve process: max growth after warm-up {summary['rss_growth_mb']} MiB"
    )
    bottom.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(args.workdir)  # the store, Ray's spills: all under --workdir
    store_root = args.workdir / f"store-{args.shards}x{args.classes}x{args.per_class}"
    print(f"building the store {store_root} (real photos, embedded in-process) ...", flush=True)
    shutil.rmtree(store_root, ignore_errors=True)  # a few seconds; always the current code's
    store, paths, vectors = make_store(
        store_root, args.caltech, args.shards, args.classes, args.per_class
    )
    ray = init_local_ray(args.workdir / "ray", num_cpus=4)
    try:
        with running_app(store, paths, vectors, shards_per_group=1) as app:  # S deployments
            before = replica_identity()
            print(
                f"app up at {app.base_url}: {len(paths)} photos in {args.shards} shards; "
                f"{args.rate:g} req/s for {args.duration:g} s, {args.image_ratio:.0%} images",
                flush=True,
            )
            t0 = time.perf_counter()
            sampler = RssSampler(args.sample_s, t0)
            sampler.start()
            barrage: dict = {}
            records = asyncio.run(run_load(app, args, t0, barrage))
            if "thread" in barrage:
                barrage["thread"].join(timeout=300)
            sampler.stop()
            wall = time.perf_counter() - t0
            after = replica_identity()
    finally:
        ray.shutdown()

    sent = [r for r in records if not r.get("dropped")]
    statuses = Counter(r["status"] for r in sent)
    outcomes = barrage.get("outcomes", [])
    bad_5xx = sum(1 for o in outcomes if o.status is not None and o.status >= 500)
    load_5xx = sum(n for s, n in statuses.items() if s is not None and s >= 500)
    rss = rss_summary(sampler.series, args.warmup_s)
    restarts = sorted(k for k in before if after.get(k) != before[k])
    summary = {
        "requests": len(sent),
        "errors_5xx": load_5xx + bad_5xx,
        "p99_ms": percentiles([r["latency_ms"] for r in sent]).get("p99_ms"),
        "rss_growth_mb": max((v["growth_mb"] for v in rss.values()), default=None),
        "bad_input_kinds": len(bad_inputs.KINDS),
        "errors": sum(1 for r in sent if not r["ok"]),
        "dropped": len(records) - len(sent),
        "restarts": len(restarts),
        "restarted": restarts,
        "achieved_rate": round(len(sent) / wall, 2),
        "latency": {
            "all": percentiles([r["latency_ms"] for r in sent]),
            "image": percentiles([r["latency_ms"] for r in sent if r["kind"] == "image"]),
            "vector": percentiles([r["latency_ms"] for r in sent if r["kind"] == "vector"]),
            "after_warmup": percentiles([r["latency_ms"] for r in sent if r["t"] >= args.warmup_s]),
        },
        "client_lag_p99_ms": percentiles([r["lag_ms"] for r in sent]).get("p99_ms"),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "error_samples": [r.get("error") for r in sent if not r["ok"]][:10],
        "bad_input_barrage": {
            "requests": len(outcomes),
            "as_expected": sum(1 for o in outcomes if o.ok),
            "errors_5xx": bad_5xx,
            "unexpected": [
                {"kind": o.kind, "status": o.status, "error": o.error, "note": o.note}
                for o in outcomes
                if not o.ok
            ],
        },
        "barrage_window_s": [barrage.get("started_s"), barrage.get("ended_s")]
        if outcomes
        else None,
        "rss_growth_definition": (
            "max over Serve processes (replicas, controller, proxy) of RSS at the last sample "
            f"minus RSS at the first sample after {args.warmup_s:g} s of warm-up, MiB"
        ),
        "rss": rss,
        "config": {
            "rate": args.rate,
            "duration_s": args.duration,
            "image_ratio": args.image_ratio,
            "shards": args.shards,
            "photos": len(paths),
            "warmup_s": args.warmup_s,
            "barrage_at_s": None if args.no_barrage else args.barrage_at_s,
            "sample_s": args.sample_s,
            "max_in_flight": args.max_in_flight,
            "open_loop": True,
            "k": 5,
            "client": "one asyncio httpx.AsyncClient in the benchmark process (shares the CPUs)",
        },
        "wall_s": round(wall, 2),
        "machine": common.machine_info(),
    }
    path = common.write_result(args.name, summary)
    plot(path.with_suffix(".png"), sent, sampler.series, summary, args)
    print(f"wrote {path}; bad-input barrage: {summary['bad_input_barrage']}")
    common.print_headline(summary)
    ok = summary["errors_5xx"] == 0 and summary["errors"] == 0 and not restarts
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
