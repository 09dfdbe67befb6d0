"""Losing a node: ``cluster-fake.yaml`` on this machine, a shard node killed under load.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/node_loss.py      # ~5 minutes

The scenario of ``tests/test_fake_cluster.py``, with its helpers (``harness/fake_cluster.py``):
Ray's fake multi-node autoscaler runs ``cluster-fake.yaml`` on 127.0.0.1; ``ray job submit``
embeds ``--photos`` Caltech-101 photos (the autoscaler starts a GPU-type worker; the fake GPU has
no CUDA, so the model runs on the CPU) and builds the shard indexes (a shard worker starts for
the build tasks); ``serve deploy`` places each shard replica on its own ``shard_host`` worker.
Then vector queries (every 0.1 s) and ``POST /images`` writes (every 0.2 s) run over HTTP while
the worker node holding a shard replica is killed (SIGKILL of its raylet, agents and workers).
Serve reschedules the replica, the autoscaler starts a worker for it, answers are full again;
finally Serve is shut down and the autoscaler removes the idle workers.

Headline keys: ``failed_queries`` (non-200 or no answer after the loss; goal 0),
``acked_writes_lost`` (acknowledged ``POST /images`` not in the store or not findable by id
afterwards; goal 0), ``seconds_to_full_answers`` (from the kill to the first full answer after
the last partial one), ``workers_started`` and ``workers_removed`` (worker nodes the autoscaler
started, and removed, over the whole run: the idle ones after the idle timeout, and the killed
one once the GCS had marked it dead; ``workers.removal_reasons`` has the autoscaler's reasons).
The plot shows every query's latency and outcome against the time since the node was killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from pipelines.local_ray import use_local_ray_env  # noqa: E402

use_local_ray_env()

from benchmarks import common  # noqa: E402

KEY = "node-loss-benchmark-key"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=40, help="Caltech-101 photos in the store")
    p.add_argument("--caltech", type=Path, default=common.CALTECH)
    p.add_argument("--name", default="node_loss", help="results/<name>.json and .png")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        common.replot(args.name, plot)
        return 0
    from harness import embed_samples as samples
    from harness import fake_cluster as fc

    work = Path(tempfile.mkdtemp(prefix="vs-nl-", dir="/tmp"))  # short: Ray's socket paths
    os.environ["TMPDIR"] = str(work)
    photos = samples.link_images(samples.caltech_subset(args.caltech, args.photos), work / "p")
    cluster = fc.FakeCluster(temp_dir=work / "ray")
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    try:
        cluster.start()
        phases["cluster_start_s"] = time.monotonic() - t0
        fc.embed_and_build(cluster, work / "p", work / "store")
        phases["embed_and_build_s"] = time.monotonic() - t0 - sum(phases.values())
        app = fc.deploy(cluster, work / "store", photos, KEY, work)
        phases["serve_deploy_s"] = time.monotonic() - t0 - sum(phases.values())
        placement = fc.placement(cluster)
        loss = fc.lose_a_shard_node(cluster, app)
        phases["node_loss_s"] = time.monotonic() - t0 - sum(phases.values())
        removal = fc.idle_removal(cluster)
        phases["scale_down_s"] = time.monotonic() - t0 - sum(phases.values())
        workers = fc.summary(cluster, (loss["killed_node"],))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    queries = loss.pop("queries")
    result = {
        "failed_queries": loss["failed_queries"],
        "acked_writes_lost": loss["acked_writes_lost"],
        "seconds_to_full_answers": loss["seconds_to_full_answers"],
        "workers_started": workers["workers_started"],
        "workers_removed": workers["workers_removed"],
        "node_loss": loss,
        "scale_down": removal,
        "workers": workers,
        "placement": placement,
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "config": {
            "cluster": "cluster-fake.yaml (Ray's fake_multinode provider, 127.0.0.1)",
            "photos": args.photos,
            "shards": fc.SHARDS,
            "queries": "JSON vector, k=5, one every 0.1 s (closed loop)",
            "writes": "POST /images, JSON vector + id, one every 0.2 s (closed loop)",
            "shard_deadline_ms": 1000,
            "node_loss": "SIGKILL of the raylet, agents and workers of the node",
            "autoscaler_heartbeat_timeout_s": int(fc.FAKE_ENV["AUTOSCALER_HEARTBEAT_TIMEOUT_S"]),
        },
        "queries": queries,
        "machine": common.machine_info(),
    }
    common.write_and_plot(args.name, result, plot)
    print(
        f"failed queries {result['failed_queries']}, acknowledged writes lost "
        f"{result['acked_writes_lost']}, full answers again after "
        f"{result['seconds_to_full_answers']} s ({loss['partial_answers']} partial of "
        f"{loss['queries_after_loss']} queries after the loss); workers started "
        f"{result['workers_started']}, removed when idle {result['workers_removed']}"
    )
    ok = result["failed_queries"] == 0 and result["acked_writes_lost"] == 0
    return 0 if ok else 1


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    queries, loss = result["queries"], result["node_loss"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    kinds = {
        "full": ([q for q in queries if q["status"] == 200 and not q["partial"]], "tab:blue"),
        "partial": ([q for q in queries if q["partial"]], "tab:orange"),
        "failed": ([q for q in queries if q["status"] != 200], "tab:red"),
    }
    for label, (rows, colour) in kinds.items():
        if rows:
            ms = [q["seconds"] * 1000 for q in rows]
            ax.scatter([q["t"] for q in rows], ms, s=8, c=colour, label=f"{label} ({len(rows)})")
    marks = (
        (0.0, "node killed"),
        (loss["seconds_node_marked_dead"], "GCS marks the node dead"),
        (loss["seconds_to_replacement_replica"], "new replica seen (state API)"),
        (loss["seconds_to_full_answers"], "full answers again"),
    )
    for i, (x, text) in enumerate(marks):
        if x is not None:
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(
                f" {text} ({x:.1f} s)",
                (x, 0.6 - 0.12 * i),
                xycoords=("data", "axes fraction"),
                ha="right" if i else "left",
                fontsize=8,
                color="dimgrey",
            )
    ax.set(yscale="log", xlabel="seconds since the shard node was killed")
    ax.set_ylabel("query latency, ms")
    ax.set_title(
        f"node loss under load: {loss['failed_queries']} failed queries, "
        f"{loss['acked_writes_lost']} acknowledged writes lost"
    )
    ax.legend(loc="upper right", fontsize=8)
    common.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
