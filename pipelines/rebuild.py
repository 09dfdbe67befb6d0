"""Background rebuild of one shard: fold its delta and tombstones into a new live version.

    python pipelines/rebuild.py --store ROOT [--shards 0,1] [--force] [--grace-s 60]

(The serving app runs the same ``rebuild_shard`` as a Ray task, from ``serve.rebuilder``.)

What one rebuild does, in this order:

1. lists the shard's embedding parts, *then* its tombstone parts (so a tombstone it did not see
   is newer than every row it reads: ``index.delta`` hides base rows by such tombstones);
2. is a no-op when the live version already covers exactly these parts and tombstones (unless
   ``force``);
3. decides whether to retrain (the drift rule below) and builds a new immutable version from all
   parts minus deleted rows (``index.build.build_shard``), recording the tombstone parts it
   applied in ``meta.json`` (``tombstone_parts``);
4. commits it to the manifest (searchers poll it and swap); a concurrent build that committed a
   newer version wins (``index.build.apply_results`` never goes back);
5. collects garbage: versions older than the previous live one at once, the previous one after
   ``grace_s`` (replicas that have not polled the manifest yet still read it); never the live one.

Drift rule (retrain or reuse the trained quantizer and PQ codebooks of the live version):
reuse when all hold, else retrain from scratch with the policy's spec:

- the live version is IVF+PQ without a pre-transform (OPQ/PCA), and the policy
  (``index.policy.choose_index``) picks the same factory string for the new row count (so the
  number of lists still suits the shard size);
- the mean squared distance of the new rows to their nearest coarse centroid is at most
  ``drift_ratio`` (default 1.5) times that of a sample of the live version's rows: the new data
  falls where the old centroids are. Both means come from up to ``DRIFT_SAMPLE`` rows.

Reuse skips k-means (most of a build's time: 43 of 82 s for 1M x 256 in ``index_build.json``);
the build still adds every row and re-measures the default nprobe / rerank candidates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import posixpath
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from index import schema  # noqa: E402
from index.build import (  # noqa: E402
    INDEX_FILE,
    META_FILE,
    VECTORS_FILE,
    build_shard,
    commit_results,
    list_versions,
)
from index.delta import read_tombstones  # noqa: E402
from index.manifest import load_manifest  # noqa: E402
from index.policy import IndexSpec, choose_index  # noqa: E402
from index.shard_index import IndexLoadError, check_version_dir  # noqa: E402
from index.store import Store  # noqa: E402

log = logging.getLogger("rebuild")

DRIFT_SAMPLE = 4096
DEFAULT_DRIFT_RATIO = 1.5
DEFAULT_GRACE_S = 60.0


@dataclasses.dataclass
class RebuildOptions:
    memory_budget: str = "4G"
    seed: int = 0
    force: bool = False
    drift_ratio: float = DEFAULT_DRIFT_RATIO  # <= 0: always retrain
    grace_s: float = DEFAULT_GRACE_S
    threads: int = 1  # FAISS threads in the task


def live_meta(store: Store, shard: int) -> dict | None:
    """``meta.json`` of the shard's live version, or None when it has none."""
    manifest = load_manifest(store)
    if manifest is None:
        raise ValueError(f"{store} has no manifest")
    version = manifest.shards[shard].version
    if version is None:
        return None
    path = posixpath.join(store.index_version_dir(shard, version), META_FILE)
    return json.loads(store.read_bytes(path))


def pending(store: Store, shard: int, meta: dict | None = None) -> dict:
    """What a rebuild of ``shard`` would fold in: new parts (and their rows), new tombstones."""
    meta = live_meta(store, shard) if meta is None else meta
    covered = set((meta or {}).get("parts") or ())
    applied = set((meta or {}).get("tombstone_parts") or ())
    parts = [p for p in store.list_parts(shard) if p not in covered]
    tombs = [p for p in store.list_tombstone_parts(shard) if p not in applied]
    return {"parts": parts, "tombstone_parts": tombs, "base_count": (meta or {}).get("count", 0)}


def _deleted(store: Store, tomb_parts: list[str]) -> dict[str, int]:
    deleted: dict[str, int] = {}
    for part in tomb_parts:
        ids, times = read_tombstones(store, part)
        for row_id, t in zip(ids, times, strict=True):
            deleted[row_id] = max(int(t), deleted.get(row_id, -1))
    return deleted


def _sample_rows(store: Store, parts: list[str], rng: np.random.Generator) -> np.ndarray:
    if not parts:
        return np.zeros((0, 0), np.float32)
    table = store.read_parquet([store.path(p) for p in parts], columns=[schema.EMBEDDING])
    vectors = schema.arrow_to_vectors(table[schema.EMBEDDING])
    if len(vectors) > DRIFT_SAMPLE:
        vectors = vectors[np.sort(rng.choice(len(vectors), DRIFT_SAMPLE, replace=False))]
    return vectors


def _mean_residual(ivf, x: np.ndarray) -> float:
    """Mean squared L2 distance of rows to their nearest coarse centroid (any metric)."""
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    _, assign = ivf.quantizer.search(np.ascontiguousarray(x, np.float32), 1)
    return float(np.square(x - centroids[assign[:, 0]]).sum(axis=1).mean())


def drift_decision(
    store: Store,
    shard: int,
    meta: dict | None,
    new_parts: list[str],
    total_rows: int,
    dim: int,
    metric: str,
    options: RebuildOptions,
):
    """``(trained index or None, spec or None, reason)`` by the drift rule in the docstring."""
    import faiss

    if meta is None or meta.get("kind") != "ivfpq":
        return None, None, "retrain: the live version is not IVF+PQ"
    if options.drift_ratio <= 0:
        return None, None, "retrain: drift_ratio <= 0 (always retrain)"
    spec = choose_index(total_rows, dim, metric, options.memory_budget)
    if spec.factory != meta.get("factory"):
        return None, None, f"retrain: policy picks {spec.factory} for {total_rows} rows"
    directory = Path(store.local_dir(store.index_version_dir(shard, meta["version"])))
    index = faiss.read_index(str(directory / INDEX_FILE))
    if isinstance(index, faiss.IndexPreTransform):
        return None, None, "retrain: the live version has a pre-transform"
    ivf = faiss.extract_index_ivf(index)
    rng = np.random.default_rng(options.seed)
    new = _sample_rows(store, new_parts, rng)
    if len(new) == 0:
        new_residual = 0.0
    else:
        new_residual = _mean_residual(ivf, new)
    base_vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
    n = len(base_vectors)
    take = np.sort(rng.choice(n, min(n, DRIFT_SAMPLE), replace=False))
    base_residual = _mean_residual(ivf, np.asarray(base_vectors[take], np.float32))
    ratio = new_residual / base_residual if base_residual > 0 else float("inf")
    detail = f"new/base mean residual {new_residual:.4f}/{base_residual:.4f} = {ratio:.2f}"
    if ratio > options.drift_ratio:
        return None, None, f"retrain: drifted ({detail} > {options.drift_ratio})"
    old_spec = IndexSpec.from_dict(meta.get("spec") or {})
    return index, old_spec, f"reuse the trained quantizer of v{meta['version']} ({detail})"


def rebuild_shard(store_uri: str, shard: int, options: RebuildOptions | None = None) -> dict:
    """Rebuild ``shard`` if it has a delta or new tombstones (or ``force``); returns a summary
    ``{"shard", "built", "version", "count", "retrained", "reason", "seconds", "gc"}``."""
    import faiss

    options = options or RebuildOptions()
    faiss.omp_set_num_threads(options.threads)
    t0 = time.perf_counter()
    store = Store(store_uri)
    manifest = load_manifest(store)
    if manifest is None:
        raise ValueError(f"{store} has no manifest")
    meta = live_meta(store, shard)
    parts = store.list_parts(shard)  # parts first, then tombstones: see the module docstring
    tomb_parts = store.list_tombstone_parts(shard)
    covered = sorted((meta or {}).get("parts") or ())
    applied = sorted((meta or {}).get("tombstone_parts") or ())
    summary = {"shard": shard, "built": False, "version": manifest.shards[shard].version}
    if not options.force and meta is not None and covered == parts and applied == tomb_parts:
        summary.update(reason="up to date", seconds=round(time.perf_counter() - t0, 3))
        summary["gc"] = collect_garbage(store, shard, options.grace_s)
        return summary
    new_parts = [p for p in parts if p not in set(covered)]
    total = sum(pq.read_metadata(store.path(p), filesystem=store.fs).num_rows for p in parts)
    trained, spec, reason = drift_decision(
        store, shard, meta, new_parts, total, manifest.dim, manifest.metric, options
    )
    log.info("shard %d: %s", shard, reason)
    result = build_shard(
        store,
        shard,
        memory_budget=options.memory_budget,
        spec=spec,
        seed=options.seed,
        force=True,
        parts=parts,
        deleted=_deleted(store, tomb_parts),
        trained=trained,
        extra_meta={
            "tombstone_parts": tomb_parts,
            "rebuild": {"retrained": trained is None, "reason": reason},
        },
    )
    committed = commit_results(store, [result])
    summary.update(
        built=True,
        version=result.version,
        live=committed.shards[shard].version,
        count=result.count,
        retrained=trained is None,
        reason=reason,
        build_seconds=result.meta["build_seconds"],
        seconds=round(time.perf_counter() - t0, 3),
    )
    summary["gc"] = collect_garbage(store, shard, options.grace_s)
    return summary


def collect_garbage(
    store: Store, shard: int, grace_s: float = DEFAULT_GRACE_S, now: float | None = None
) -> list[int]:
    """Delete old version directories of ``shard``; returns the versions removed.

    Versions below the previous live one go at once; the previous live one (the highest below
    the live one) goes ``grace_s`` after the live version was built. The live version and any
    newer directory (a build in progress or not yet committed) are never touched.

    "The live one" here is the newest version at or below the manifest's that can be loaded
    (``_usable``): when a committed version is corrupt or lost a file, searchers keep serving,
    or restart on, the newest one that loads, so that one and its predecessor must survive.
    """
    manifest = load_manifest(store)
    if manifest is None:
        return []
    state = manifest.shards[shard]
    if state.version is None:
        return []
    now = time.time() if now is None else now
    versions = list_versions(store, shard)
    anchor = next(
        (
            v
            for v in sorted(versions, reverse=True)
            if v <= state.version and _usable(store, shard, v)
        ),
        None,
    )
    if anchor is None:  # nothing loads: keep everything for whoever repairs it
        return []
    older = [v for v in versions if v < anchor]
    if not older:
        return []
    previous = max(older)
    expired = anchor == state.version and now - (state.built_at or now) >= grace_s
    doomed = [v for v in older if v < previous or expired]
    for version in doomed:
        try:
            store.fs.rm(store.index_version_dir(shard, version), recursive=True)
        except FileNotFoundError:
            pass
    return doomed


_USABLE: dict[tuple[str, int, int], bool] = {}  # versions are immutable: check each once


def _usable(store: Store, shard: int, version: int) -> bool:
    """Whether ``ShardIndex.load`` would accept this version's files. Local stores verify sizes
    and SHA-256; on object stores only meta.json's presence is checked (no download)."""
    key = (store.root, shard, version)
    if key not in _USABLE:
        directory = store.index_version_dir(shard, version)
        try:
            if store.is_local:
                check_version_dir(directory, verify=True)
            elif not store.exists(posixpath.join(directory, "meta.json")):
                raise IndexLoadError(f"{directory}: no meta.json")
            _USABLE[key] = True
        except IndexLoadError:
            _USABLE[key] = False
    return _USABLE[key]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Fold each shard's delta into a new version.")
    parser.add_argument("--store", required=True)
    parser.add_argument("--shards", help="comma-separated subset (default: all)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--memory-budget", default="4G")
    parser.add_argument("--drift-ratio", type=float, default=DEFAULT_DRIFT_RATIO)
    parser.add_argument("--grace-s", type=float, default=DEFAULT_GRACE_S)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    store = Store(args.store)
    manifest = load_manifest(store)
    if manifest is None:
        parser.error(f"{args.store} has no manifest")
    shards = [int(s) for s in args.shards.split(",")] if args.shards else range(manifest.num_shards)
    options = RebuildOptions(
        memory_budget=args.memory_budget,
        force=args.force,
        drift_ratio=args.drift_ratio,
        grace_s=args.grace_s,
        threads=args.threads,
    )
    for shard in shards:
        print(rebuild_shard(store.uri, shard, options), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
