"""What an idle replica costs the object store: requests per replica-shard per hour, counted.

A ShardSearcher replica (the deployment's class, in this process) serves a store on moto's S3
server through a counting proxy (``harness.faultproxy``, no faults): after a warm-up long enough
for its polls to back off to their caps, every request it makes in a window is counted by kind
(LIST, GET, PUT, ...) and extrapolated to an hour. Nothing writes or searches meanwhile: the
replica is idle. Measured twice: with the serve config's defaults (delta and manifest polls back
off while idle, ``serve.deployments.idle``; leases every 30 s) and with the previous defaults
(delta polls every 0.5 s, manifest every 30 s, leases every 10 s, no backoff).

Every interval is divided by ``--speedup`` (default 10) so that an idle hour's pattern shows in
minutes: the replica's requests are driven by its timers alone while idle, so the count per
simulated hour is what an hour at the real intervals makes (the count is multiplied back).

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/control_plane_idle.py

Adds ``idle_requests_per_replica_shard_hour`` (and ``idle``, the detail) to
``benchmarks/results/control_plane.json``, keeping its other keys; plots control_plane_idle.png.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness.faultproxy import FaultProxy, FaultRates, FaultSchedule  # noqa: E402
from harness.polling import wait_for  # noqa: E402
from harness.s3 import S3Server  # noqa: E402
from harness.stores import write_store  # noqa: E402
from index.live.rebuild import rebuild_shard  # noqa: E402
from index.storage.store import Store  # noqa: E402
from serve.config import ServeConfig  # noqa: E402
from serve.deployments.searcher import ShardSearcher  # noqa: E402

PREVIOUS = {  # the defaults before issue #24.4
    "delta_poll_s": 0.5,
    "reload_interval_s": 30.0,
    "lease_interval_s": 10.0,
    "delta_poll_idle_max_s": None,
    "reload_idle_max_s": None,
    "poll_idle_after_s": 10.0,
}


def settings(previous: bool) -> dict:
    config = ServeConfig(store="s3://unused")
    names = list(PREVIOUS)
    return dict(PREVIOUS) if previous else {n: getattr(config, n) for n in names}


def scaled(values: dict, speedup: float) -> dict:
    return {k: None if v is None else v / speedup for k, v in values.items()}


def measure(uri, options, proxy, shards: int, values: dict, speedup: float, window_s) -> dict:
    """Count an idle replica's requests over the window, after the warm-up."""
    s = scaled(values, speedup)
    searcher = ShardSearcher.func_or_class(
        uri,
        list(range(shards)),
        reload_interval_s=s["reload_interval_s"],
        delta_poll_s=s["delta_poll_s"],
        storage_options=options,
        lease_interval_s=s["lease_interval_s"],
        delta_poll_idle_max_s=s["delta_poll_idle_max_s"],
        reload_idle_max_s=s["reload_idle_max_s"],
        poll_idle_after_s=s["poll_idle_after_s"],
    )
    try:
        # warm-up: the idle threshold, then the doublings to the longest cap, twice over
        caps = [c for c in (s["delta_poll_idle_max_s"], s["reload_idle_max_s"]) if c]
        warm = s["poll_idle_after_s"] + 2 * (max(caps) if caps else s["reload_interval_s"])
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started >= warm, warm + 60, "the warm-up")
        before = collections.Counter(proxy.counts)
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started >= window_s, window_s + 60, "the window")
        counted = collections.Counter(proxy.counts) - before
        window = time.monotonic() - started
    finally:
        searcher._close()
    simulated_h = window * speedup / 3600
    kinds = {k.removeprefix("kind:"): n for k, n in counted.items() if k.startswith("kind:")}
    per_hour = counted["requests"] / simulated_h / shards
    return {
        "settings": values,
        "speedup": speedup,
        "window_s": round(window, 1),
        "simulated_hours": round(simulated_h, 3),
        "requests": counted["requests"],
        "by_kind": kinds,
        "requests_per_replica_shard_hour": round(per_hour, 1),
        "by_kind_per_replica_shard_hour": {
            k: round(n / simulated_h / shards, 1) for k, n in sorted(kinds.items())
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=5.0, help="of the backoff run")
    parser.add_argument("--window-s", type=float, default=180.0, help="measured window (real s)")
    parser.add_argument("--previous-window-s", type=float, default=60.0, help="at speedup 1")
    parser.add_argument("--shards", type=int, default=2, help="shards in the replica's group")
    args = parser.parse_args(argv)
    server = S3Server()
    proxy = FaultProxy(server.endpoint, FaultSchedule(0, FaultRates(), enabled=False)).start()
    try:
        uri = f"{server.new_bucket()}/store"
        options = proxy.storage_options
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2000, 16)).astype(np.float32)
        ids = [f"r{i:05d}" for i in range(len(x))]
        store = write_store(Store(uri, options), ids, ids, x, args.shards)
        for shard in range(args.shards):
            rebuild_shard(store, shard)
        with tempfile.TemporaryDirectory(prefix="vs-idle-") as cache:
            os.environ["VISUAL_SEARCH_CACHE"] = cache
            runs = {}
            plan = (
                ("backoff", settings(False), args.speedup, args.window_s),
                # constant rates; at real speed (a 25 ms poll interval would not keep up)
                ("previous", settings(True), 1.0, args.previous_window_s),
            )
            for name, values, speedup, window_s in plan:
                runs[name] = measure(uri, options, proxy, args.shards, values, speedup, window_s)
                print(name, json.dumps(runs[name]), flush=True)
    finally:
        proxy.stop()
        server.stop()
    now, before = runs["backoff"], runs["previous"]
    idle = {
        "command": common.command("control_plane_idle", argv),
        "idle_requests_per_replica_shard_hour": now["requests_per_replica_shard_hour"],
        "idle_requests_per_replica_shard_hour_previous": before["requests_per_replica_shard_hour"],
        "speedup": args.speedup,
        "shards_per_replica": args.shards,
        "runs": runs,
        "machine": common.machine_info(),
    }
    path = common.RESULTS_DIR / "control_plane.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["idle_requests_per_replica_shard_hour"] = idle["idle_requests_per_replica_shard_hour"]
    result["idle"] = idle
    common.write_result("control_plane", result)
    plot(idle, common.RESULTS_DIR / "control_plane_idle.png")
    print(json.dumps({k: v for k, v in idle.items() if not isinstance(v, dict)}, indent=1))


def plot(idle: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = ["previous", "backoff"]
    kinds = sorted({k for r in idle["runs"].values() for k in r["by_kind_per_replica_shard_hour"]})
    bottom = np.zeros(len(names))
    for kind in kinds:
        values = [idle["runs"][n]["by_kind_per_replica_shard_hour"].get(kind, 0) for n in names]
        ax.bar(names, values, bottom=bottom, label=kind)
        bottom += values
    ax.set_yscale("log")
    ax.axhline(360, color="grey", ls="--", lw=0.8, label="target 360")
    ax.set_ylabel("object-store requests per replica-shard per hour (idle)")
    common.label_bars(ax, ax.patches[-len(names) :], [f"{b:,.0f}" for b in bottom])
    ax.legend(fontsize=8)
    common.machine_title(fig, "an idle replica's object-store requests", idle)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
