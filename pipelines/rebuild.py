"""Rebuild shards by hand: fold each shard's delta and tombstones into a new live version.

    python pipelines/rebuild.py --store ROOT [--shards 0,1] [--force] [--retrain] [--grace-s 60]

Runs ``index.live.rebuild.rebuild_shard`` (the one build path: the same function the serving app's
``Rebuilder`` runs as a Ray task and ``pipelines/build_index.py`` runs per shard) in this
process, one shard after another, then garbage-collects each shard (``index.storage.gc``: old
versions no
replica serves, and the parts and tombstones the new version folded in, after ``--grace-s``).
For a parallel build on a cluster use ``pipelines/build_index.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    for shard in shards:
        summary = rebuild_shard(store, shard, options)
        summary["gc"] = collect_garbage(store, shard, args.grace_s)
        print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
