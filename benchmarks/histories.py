"""Nothing lost under any interleaving: many seeded histories against the app on S3 with faults.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/histories.py --seeds 50

The longer run of ``tests/test_histories.py`` (its helpers are ``harness/workload.py`` and
``harness/history.py``): the app over a small indexed store on moto's S3, reading and writing
through the seeded fault proxy (``harness/faultproxy.py``, botocore's standard retries in the
app). For each seed, ``--clients`` seeded clients add (with and without ids), delete, re-add and
read for ``--duration`` seconds (as fast as the app answers, up to ``--ops``); every seed also
SIGKILLs a ShardSearcher replica at a seeded time in the first half, every other seed asks the
Rebuilder for a forced rebuild after it (every fourth with ``retrain``), and every third seed
runs a command-line build of one shard (``pipelines/rebuild.py --force``, some with
``--retrain``) a second later, racing the Rebuilder's when both run. So kills land mid-load,
mid-swap and mid-rebuild by turns, and concurrent builds meet the parent-checked commit. After
``/readyz`` is 200 again and a quiet period past the documented bound, every id is read once,
and ``harness.history.check`` lists the anomalies, each with its seed. Every history is
written to ``--workdir`` as JSON (``History.load`` + ``check`` replays the verdict); the
result JSON is rewritten after every history.

Headline keys: ``anomalies`` (goal 0; per class in ``anomaly_classes``), ``histories``,
``operations``, ``faults_injected`` (S3 faults the proxy injected), ``replica_kills``,
``unavailable`` (503 ``shard_unavailable`` answers while a killed replica was down: the API's
documented answer then, not anomalies), ``top1_misses`` (an id visible to a search with its
own vector, but not ranked first).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from pipelines.local_ray import use_local_ray_env  # noqa: E402

use_local_ray_env()

from benchmarks import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=50, help="histories: seeds START..START+N-1")
    p.add_argument("--start", type=int, default=1, help="the first seed (rerun one: --seeds 1)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load per history")
    p.add_argument("--ops", type=int, default=20_000, help="operations per history at most")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vs-histories")
    p.add_argument("--name", default="histories", help="results/<name>.json and .png")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the histories of seeds before --start from results/<name>.json (a long run "
        "in several sittings: the totals are over every kept history)",
    )
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    return p.parse_args(argv)


def run_one(app, seed: int, args: argparse.Namespace) -> dict:
    import numpy as np

    from harness.history import READS, WRITES, check, outage_windows, summary, unavailable
    from harness.workload import DELTA_POLL_S

    rebuild = seed % 2 == 0
    kill_at = float(np.random.default_rng([seed, 7]).uniform(0.1, 0.5)) * args.duration
    faults_before = app.proxy.faults_injected
    work = app.workload(
        seed,
        clients=args.clients,
        duration_s=args.duration,
        max_ops=args.ops,
        kill_at_s=kill_at,
        rebuild_at_s=kill_at + 0.15 * args.duration if rebuild else None,
        retrain=seed % 4 == 0,
        # a command-line build racing the Rebuilder's (or alone), with and without --retrain
        cli_build_at_s=kill_at + 0.15 * args.duration + 1.0 if seed % 3 == 0 else None,
        cli_retrain=seed % 4 == 1,
    )
    history = work.run()
    # a replica restarted over thousands of one-row parts under faults took 273 s to load
    finals = work.final_reads(quiet_s=6 * DELTA_POLL_S, ready_timeout_s=600)
    anomalies = check(history, finals)
    path = history.dump(args.workdir / f"history-{seed}.json")
    ops = history.snapshot()
    windows = outage_windows(ops)
    row = {
        "seed": seed,
        "rebuild": rebuild,
        "retrain": rebuild and seed % 4 == 0,
        "cli_build": [o.status for o in history.snapshot() if o.kind == "cli_build"],
        "kill_at_s": round(kill_at, 2),
        "operations": sum(
            1 for o in ops if o.kind in WRITES + READS and not o.outcome.get("final")
        ),
        "counts": history.counts(),
        "final_reads": len(finals),
        "faults_injected": app.proxy.faults_injected - faults_before,
        "kills": work.kills,
        # None: not ready again within the kill's 180 s watch (the final reads wait longer)
        "recovery_s": [round(b - a, 2) if math.isfinite(b) else None for a, b in windows],
        "unavailable": sum(unavailable(o, windows) for o in ops),
        "top1_misses": work.top1_misses,
        "anomalies": len(anomalies),
        "anomaly_classes": summary(anomalies),
        "first_anomalies": [str(a) for a in anomalies[:20]],
        "history": str(path),
    }
    print(
        f"seed {seed}: {row['operations']} ops, {row['faults_injected']} faults, "
        f"{row['kills']} kills (back in {row['recovery_s']} s), "
        f"anomalies {row['anomaly_classes']}",
        flush=True,
    )
    return row


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    rows = result["runs"]
    fig, ax = plt.subplots(figsize=(8, 4))
    seeds = [str(r["seed"]) for r in rows]
    colors = ["#c44e52" if r["anomalies"] else "#4c72b0" for r in rows]
    ax.bar(seeds, [r["operations"] for r in rows], color=colors)
    ax.tick_params(axis="x", labelsize=6, rotation=90)
    ax.set_title(
        f"{result['operations']:,} operations, {result['faults_injected']:,} S3 faults, "
        f"{result['replica_kills']} replica kills: {result['anomalies']} anomalies",
        fontsize=9,
    )
    ax.set_xlabel("seed (red: anomalies found)")
    ax.set_ylabel("operations")
    common.machine_title(fig, "Seeded histories on S3 with faults", result)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        common.replot(args.name, plot)
        return 0
    from harness.workload import s3_app_session

    common.work_in(args.workdir)
    rows, sittings = kept_runs(args) if args.resume else ([], [])
    result: dict = {}
    with s3_app_session(args.workdir) as app:
        for seed in range(args.start, args.start + args.seeds):
            rows.append(run_one(app, seed, args))
            result = summarise(rows, argv, sittings)
            common.write_result(args.name, result)  # a long run keeps what it has done
    common.write_and_plot(args.name, result, plot, headline=True)
    return 1 if result["anomalies"] else 0


def kept_runs(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The earlier sittings' histories (seeds before ``--start``) from the result JSON, and the
    commands that ran them."""
    path = common.RESULTS_DIR / f"{args.name}.json"
    if not path.exists():
        return [], []
    earlier = json.loads(path.read_text())
    rows = [r for r in earlier.get("runs", []) if r["seed"] < args.start]
    for r in rows:  # an earlier sitting wrote an unseen recovery as Infinity
        r["recovery_s"] = [None if s == math.inf else s for s in r["recovery_s"]]
    return rows, earlier.get("sittings", [earlier["command"]])


def summarise(rows: list[dict], argv, sittings: list[str] = ()) -> dict:
    recovery = sorted(s for r in rows for s in r["recovery_s"] if s is not None)
    return {
        "command": common.command("histories", argv),
        "sittings": [*sittings, common.command("histories", argv)],  # each sitting's command
        "histories": len(rows),
        "operations": sum(r["operations"] for r in rows),
        "faults_injected": sum(r["faults_injected"] for r in rows),
        "replica_kills": sum(r["kills"] for r in rows),
        "rebuilds_requested": sum(r["rebuild"] for r in rows),
        "cli_builds": sum(len(r["cli_build"]) for r in rows),
        "cli_builds_failed": sum(1 for r in rows for rc in r["cli_build"] if rc != 0),
        "anomalies": sum(r["anomalies"] for r in rows),
        "anomaly_classes": {
            kind: sum(r["anomaly_classes"].get(kind, 0) for r in rows)
            for kind in rows[0]["anomaly_classes"]
        },
        "unavailable": sum(r["unavailable"] for r in rows),
        "recovery_s_median": recovery[len(recovery) // 2] if recovery else None,
        "top1_misses": sum(r["top1_misses"] for r in rows),
        "runs": rows,
    }


if __name__ == "__main__":
    sys.exit(main())
