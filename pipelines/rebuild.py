"""Rebuild shards by hand: fold each shard's delta and tombstones into a new live version.

    python pipelines/rebuild.py --store ROOT [--shards 0,1] [--force] [--retrain] [--grace-s 60]
        [--gc-wait-s 0]

Runs ``index.live.rebuild.rebuild_shard`` (the one build path: the same function the serving app's
``Rebuilder`` runs as a Ray task and ``pipelines/build_index.py`` runs per shard) in this
process, one shard after another, and garbage-collects each shard (``index.storage.gc``: old
versions no replica serves, and the parts and tombstones the new version folded in, once
``--grace-s`` has passed since the version went live) before and after its rebuild. The
collection right after a rebuild falls inside the grace period, so on a store with no serving
app (whose ``Rebuilder`` collects later) this rebuild's garbage would wait for the next run:
``--gc-wait-s S`` keeps collecting for up to ``S`` seconds until no shard waits (for its grace
or for a replica's lease). A build superseded by another's commit is planned again
(``rebuild_shard``); its summary says ``superseded``. For a parallel build on a cluster use
``pipelines/build_index.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.job_python import require_project_python  # noqa: E402

if __name__ == "__main__":  # a job under a Python without the project: say so, exit 2
    require_project_python("pipelines/rebuild.py")

from index.live.rebuild import DEFAULT_DRIFT_RATIO, RebuildOptions, rebuild_shard  # noqa: E402
from index.storage.gc import DEFAULT_GRACE_S, collect_garbage  # noqa: E402
from index.storage.manifest import load_manifest  # noqa: E402
from index.storage.store import Store, parse_storage_options  # noqa: E402
from pipelines.store_args import add_store_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Fold each shard's delta into a new version.")
    add_store_args(parser, required=True)
    parser.add_argument("--shards", help="comma-separated subset (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--retrain", action="store_true", help="never reuse the quantizer")
    parser.add_argument("--memory-budget", default="4G")
    parser.add_argument("--drift-ratio", type=float, default=DEFAULT_DRIFT_RATIO)
    parser.add_argument("--grace-s", type=float, default=DEFAULT_GRACE_S)
    parser.add_argument(
        "--gc-wait-s",
        type=float,
        default=0.0,
        help="after the rebuilds, keep collecting garbage for up to this long until none waits",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    store = Store(args.store, parse_storage_options(args.storage_options))
    manifest = load_manifest(store)
    if manifest is None:
        parser.error(f"{args.store} has no manifest")
    shards = [int(s) for s in args.shards.split(",")] if args.shards else range(manifest.num_shards)
    options = RebuildOptions(
        memory_budget=args.memory_budget,
        force=args.force,
        retrain=args.retrain,
        drift_ratio=args.drift_ratio,
        threads=args.threads,
    )
    waiting = []
    for shard in shards:
        collect_garbage(store, shard, args.grace_s)  # what earlier rebuilds left, grace passed
        summary = rebuild_shard(store, shard, options)
        summary["gc"] = collect_garbage(store, shard, args.grace_s)
        print(summary, flush=True)
        if summary["gc"]["waiting"] is not None:
            waiting.append(shard)
    collect_until_done(store, waiting, args.grace_s, args.gc_wait_s)
    return 0


GC_POLL_S = 1.0


def collect_until_done(store: Store, shards: list[int], grace_s: float, wait_s: float) -> None:
    """Collect ``shards`` again every ``GC_POLL_S`` until none waits or ``wait_s`` has passed."""
    deadline = time.monotonic() + wait_s
    while shards and time.monotonic() < deadline:
        time.sleep(min(GC_POLL_S, max(0.0, deadline - time.monotonic())))
        still = []
        for shard in shards:
            gc = collect_garbage(store, shard, grace_s)
            if gc["versions"] or gc["parts"]:
                print({"shard": shard, "gc": gc}, flush=True)
            if gc["waiting"] is not None:
                still.append(shard)
        shards = still
    for shard in shards:
        print({"shard": shard, "gc": "still waiting; the next run or the Rebuilder collects"})


if __name__ == "__main__":
    sys.exit(main())
