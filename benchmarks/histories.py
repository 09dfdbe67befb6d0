"""Nothing lost under any interleaving: many seeded histories against the app on S3 with faults.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/histories.py --seeds 10 --duration 60

The longer run of ``tests/test_histories.py`` (its helpers are ``harness/workload.py`` and
``harness/history.py``): the app over a small indexed store on moto's S3, reading and writing
through the seeded fault proxy (``harness/faultproxy.py``, botocore's standard retries in the
app). For each seed, ``--clients`` seeded clients add (with and without ids), delete, re-add and
read for ``--duration`` seconds; every other seed also SIGKILLs a ShardSearcher replica and asks
for a forced rebuild mid-run. After a quiet period past the documented bound every id is read
once, and ``harness.history.check`` lists the anomalies, each with its seed. Every history is
written to ``--workdir`` as JSON (``History.load`` + ``check`` replays the verdict).

Headline keys: ``anomalies`` (goal 0; per class in ``anomaly_classes``), ``operations``,
``faults_injected`` (S3 faults the proxy injected), ``kills``, ``top1_misses`` (an id visible
to a search with its own vector, but not ranked first).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from pipelines.local_ray import init_local_ray, use_local_ray_env  # noqa: E402

use_local_ray_env()

from benchmarks import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=6, help="histories, seeds 1..N")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per history")
    p.add_argument("--ops", type=int, default=600, help="operations per history at most")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vs-histories")
    p.add_argument("--name", default="histories", help="results/<name>.json and .png")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    return p.parse_args(argv)


def run_one(app, seed: int, args: argparse.Namespace) -> dict:
    from harness.history import check, summary
    from harness.workload import DELTA_POLL_S

    chaos = seed % 2 == 0
    faults_before = app.proxy.faults_injected
    work = app.workload(
        seed,
        clients=args.clients,
        duration_s=args.duration,
        max_ops=args.ops,
        kill_at_s=args.duration / 3 if chaos else None,
        rebuild_at_s=args.duration / 2 if chaos else None,
    )
    history = work.run()
    finals = work.final_reads(quiet_s=6 * DELTA_POLL_S)
    anomalies = check(history, finals)
    path = history.dump(args.workdir / f"history-{seed}.json")
    row = {
        "seed": seed,
        "chaos": chaos,
        "operations": sum(history.counts().values()) - len(finals),
        "counts": history.counts(),
        "faults_injected": app.proxy.faults_injected - faults_before,
        "kills": work.kills,
        "top1_misses": work.top1_misses,
        "anomalies": len(anomalies),
        "anomaly_classes": summary(anomalies),
        "first_anomalies": [str(a) for a in anomalies[:20]],
        "history": str(path),
    }
    print(
        f"seed {seed}: {row['operations']} ops, {row['faults_injected']} faults, "
        f"{row['kills']} kills, anomalies {row['anomaly_classes']}",
        flush=True,
    )
    return row


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    rows = result["histories"]
    fig, ax = plt.subplots(figsize=(8, 4))
    seeds = [str(r["seed"]) + (" (kill)" if r["chaos"] else "") for r in rows]
    bars = ax.bar(seeds, [r["operations"] for r in rows], color="#4c72b0")
    common.label_bars(
        ax, bars, [f"{r['anomalies']} anomalies\n{r['faults_injected']} faults" for r in rows]
    )
    ax.set_xlabel("seed")
    ax.set_ylabel("operations")
    common.machine_title(fig, "Seeded histories on S3 with faults", result)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        common.replot(args.name, plot)
        return 0
    from harness.s3 import S3Server
    from harness.workload import s3_app

    common.work_in(args.workdir)
    ray = init_local_ray(args.workdir / "ray", num_cpus=4)
    server = S3Server()
    try:
        with s3_app(server) as app:
            rows = [run_one(app, seed, args) for seed in range(1, args.seeds + 1)]
    finally:
        server.stop()
        ray.shutdown()
    result = {
        "command": common.command("histories", argv),
        "anomalies": sum(r["anomalies"] for r in rows),
        "operations": sum(r["operations"] for r in rows),
        "faults_injected": sum(r["faults_injected"] for r in rows),
        "kills": sum(r["kills"] for r in rows),
        "top1_misses": sum(r["top1_misses"] for r in rows),
        "histories": rows,
    }
    common.write_and_plot(args.name, result, plot, headline=True)
    return 1 if result["anomalies"] else 0


if __name__ == "__main__":
    sys.exit(main())
