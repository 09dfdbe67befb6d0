"""Build a shard's next index version: the one build path, for first builds and rebuilds alike.

``pipelines/build_index.py`` (one Ray task per shard), ``pipelines/rebuild.py`` (by hand) and the
serving app's ``Rebuilder`` all call ``rebuild_shard``; there is no other way a version is made.
No Ray here: callers decide where it runs.

What one build does, in this order:

1. plans the shard (``index.storage.coverage``: lists its parts, then its tombstones) and stops
when the
   live version already covers them all, unless ``force``;
2. decides whether to retrain (the drift rule below) or reuse the live version's quantizer;
3. reads the live version's base parts, the new parts and its tombstones (the live version's
   ``tombstones.parquet`` and the tombstone parts it did not apply), keeps the visible rows
   (``index.rows.visibility``: newest copy of an id, deletes applied), sorted by id;
4. builds the index from those arrays (``index.ann.build.build_arrays``), passed through the
   store's transform when it has one (``index.ann.transform``: the version then holds the
   reduced vectors; the base parts keep the model's), into a local directory,
   with ``tombstones.parquet`` (the deletes it applied: all of them by default, or those of the
   last ``tombstone_keep_s``);
5. **compacts**: writes the rows as a few large ``base-<version dir>-NNNNN.parquet`` parts
   (``base_part_bytes`` each) and records in ``meta.json`` the base parts, every ``part-*``
   file whose rows they now hold (``parts``: all it listed) and the tombstone parts it applied
   (``tombstone_parts``);
   garbage collection (``index.storage.gc``) retires those inputs later;
6. publishes the directory under a unique name (``index.storage.publish``) and commits it to the
   manifest, but only while the live version is still the one it planned from (its *parent*,
   ``meta["parent"]``). When another build committed first, this one is superseded: it is
   discarded and ``rebuild_shard`` plans again from the new live version (up to
   ``commit_attempts`` builds), else reports ``"superseded": true`` with ``"built": false``.

Drift rule (retrain or reuse the trained quantizer and PQ codebooks of the live version):
reuse when all hold, else retrain from scratch with the policy's spec:

- the live version is IVF+PQ without a pre-transform (OPQ/PCA), and the policy
  (``index.ann.policy.choose_index``) picks the same factory string for the new row count (so the
  number of lists still suits the shard size), and ``retrain`` was not asked for;
- the mean squared distance of the new rows to their nearest coarse centroid is at most
  ``drift_ratio`` (default 1.5) times that of a sample of the live version's rows: the new data
  falls where the old centroids are. Both means come from up to ``DRIFT_SAMPLE`` rows.

Reuse skips k-means (most of a build's time: 43 of 82 s for 1M x 256 in ``index_build.json``);
the build still adds every row and re-measures the default nprobe / rerank candidates.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index.ann.build import build_arrays
from index.ann.ivf_lists import exact_quantizer
from index.ann.policy import IndexSpec, choose_index
from index.ann.transform import Transform, load_transform
from index.rows import schema
from index.rows.metadata import TYPES
from index.rows.visibility import newest_deletes, read_visible
from index.storage.coverage import ShardPlan, base_parts_of, plan_shard
from index.storage.manifest import load_manifest
from index.storage.publish import (
    ShardBuildResult,
    commit_results,
    committed,
    discard,
    next_version,
    publish,
    staging_dir,
)
from index.storage.store import BASE_PREFIX, Store
from index.storage.versions import INDEX_FILE, TOMBSTONES_FILE, VECTORS_FILE, new_version_name
from index.units import parse_bytes

log = logging.getLogger(__name__)

DRIFT_SAMPLE = 4096
DEFAULT_DRIFT_RATIO = 1.5
DEFAULT_BASE_PART_BYTES = 128 * 2**20
DEFAULT_TOMBSTONE_KEEP_S = None  # keep every applied delete (ids + times: small), see below
ROW_OVERHEAD_BYTES = 64  # id, uri, sizes and timestamps of a row, roughly, besides its vector

Stage = Callable[[str], None]


@dataclasses.dataclass
class RebuildOptions:
    """How a shard is (re)built. ``force``: build even when up to date; ``retrain``: never
    reuse the live quantizer; ``drift_ratio <= 0`` also always retrains."""

    memory_budget: str = "4G"
    seed: int = 0
    force: bool = False
    retrain: bool = False
    drift_ratio: float = DEFAULT_DRIFT_RATIO
    threads: int = 1  # FAISS threads of the build
    spec: IndexSpec | None = None  # None: the policy's rules
    tune: bool = True
    base_part_bytes: int | str = DEFAULT_BASE_PART_BYTES
    # how long a version keeps the deletes it applied (None: always). They hide late-arriving
    # older copies of deleted rows, and tell the embedding job a deleted image is not new.
    tombstone_keep_s: float | None = DEFAULT_TOMBSTONE_KEEP_S
    # builds tried when another build's commit supersedes this one's (each plans afresh)
    commit_attempts: int = 3


# ---- planning -----------------------------------------------------------------------------------
def source_rows(store: Store, plan: ShardPlan) -> int:
    """Rows a build of ``plan`` would read (before duplicates and deletes are dropped)."""
    return sum(store.parquet_rows(store.path(p)) for p in plan.source_parts)


def delta_rows(store: Store, plan: ShardPlan, known: dict[str, int] | None = None) -> int:
    """Rows in the parts the live version does not cover (``known`` caches rows per part)."""
    known = {} if known is None else known
    total = 0
    for part in plan.new_parts:
        if part not in known:
            known[part] = store.parquet_rows(store.path(part))
        total += known[part]
    return total


# ---- the drift rule -----------------------------------------------------------------------------
def _mean_residual(ivf, x: np.ndarray) -> float:
    """Mean squared L2 distance of rows to their nearest coarse centroid (any metric)."""
    scan = exact_quantizer(ivf)  # an HNSW quantizer's nearest is a guess (index.ann.policy)
    centroids = scan.reconstruct_n(0, ivf.nlist)
    _, assign = scan.search(np.ascontiguousarray(x, np.float32), 1)
    return float(np.square(x - centroids[assign[:, 0]]).sum(axis=1).mean())


def drift_decision(
    store: Store,
    plan: ShardPlan,
    new_vectors: np.ndarray,
    total_rows: int,
    dim: int,
    metric: str,
    options: RebuildOptions,
) -> tuple[faiss.Index | None, IndexSpec | None, str]:
    """``(trained index or None, spec or None, reason)`` by the drift rule in the docstring."""
    meta = plan.meta
    if options.spec is not None:
        return None, options.spec, "retrain: the caller fixed the index spec"
    if meta is None or meta.get("kind") != "ivfpq":
        return None, None, "retrain: the live version is not IVF+PQ"
    if options.retrain or options.drift_ratio <= 0:
        return None, None, "retrain: asked for"
    spec = choose_index(total_rows, dim, metric, options.memory_budget)
    if spec.factory != meta.get("factory"):
        return None, None, f"retrain: policy picks {spec.factory} for {total_rows} rows"
    directory = Path(store.local_dir(store.index_version_dir(plan.shard, plan.state.dir)))
    index = faiss.read_index(str(directory / INDEX_FILE))
    if isinstance(index, faiss.IndexPreTransform):
        return None, None, "retrain: the live version has a pre-transform"
    ivf = faiss.extract_index_ivf(index)
    rng = np.random.default_rng(options.seed)
    if len(new_vectors) > DRIFT_SAMPLE:
        new_vectors = new_vectors[np.sort(rng.choice(len(new_vectors), DRIFT_SAMPLE, False))]
    new_residual = _mean_residual(ivf, new_vectors) if len(new_vectors) else 0.0
    base_vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
    n = len(base_vectors)
    take = np.sort(rng.choice(n, min(n, DRIFT_SAMPLE), replace=False))
    base_residual = _mean_residual(ivf, np.asarray(base_vectors[take], np.float32))
    ratio = new_residual / base_residual if base_residual > 0 else float("inf")
    detail = f"new/base mean residual {new_residual:.4f}/{base_residual:.4f} = {ratio:.2f}"
    if ratio > options.drift_ratio:
        return None, None, f"retrain: drifted ({detail} > {options.drift_ratio})"
    old_spec = IndexSpec.from_dict(meta.get("spec") or {})
    return index, old_spec, f"reuse the trained quantizer of {plan.state.dir} ({detail})"


# ---- reading ------------------------------------------------------------------------------------
def read_tombstones(store: Store, plan: ShardPlan) -> pa.Table | None:
    """Every delete that applies to the next build: the live version's own
    (``tombstones.parquet``) and the tombstone parts it did not apply.

    The parts the live version applied are not read again: its ``tombstones.parquet`` holds
    their deletes, and garbage collection may retire them at any moment once that version is
    live (a command-line build racing the Rebuilder failed on one GC had just removed: found by
    the history checker, ``benchmarks/histories.py`` seeds 3, 6, 24, 27). A live version without
    that file (written before it existed) has all its parts read, as GC keeps them."""
    tables = []
    parts = plan.tombstone_parts
    if plan.meta is not None and TOMBSTONES_FILE in (plan.meta.get("files") or {}):
        path = posixpath.join(store.index_version_dir(plan.shard, plan.state.dir), TOMBSTONES_FILE)
        tables.append(store.read_table(path, schema=schema.TOMBSTONES_SCHEMA))
        parts = plan.new_tombstones
    tables += [store.read_table(store.path(p), schema=schema.TOMBSTONES_SCHEMA) for p in parts]
    return pa.concat_tables(tables) if tables else None


def read_rows(store: Store, plan: ShardPlan, dim: int) -> pa.Table:
    """Every row a build reads, base parts first (arrival order matters only for ties)."""
    parts = plan.source_parts
    if not parts:
        return schema.embeddings_table([], [], np.zeros((0, dim), np.float32))
    table = store.read_parquet([store.path(p) for p in parts])
    vectors_type = table.schema.field(schema.EMBEDDING).type
    if getattr(vectors_type, "list_size", dim) != dim:
        raise ValueError(f"parts hold {vectors_type.list_size}-d vectors, manifest says {dim}")
    return table


def write_base_parts(
    store: Store, shard: int, name: str, table: pa.Table, part_bytes: int
) -> list[str]:
    """The build's rows as ``base-<name>-NNNNN.parquet`` parts of about ``part_bytes``."""
    dim = table.schema.field(schema.EMBEDDING).type.list_size
    rows_per_part = max(1, part_bytes // (dim * 4 + ROW_OVERHEAD_BYTES))
    out = []
    for i, start in enumerate(range(0, table.num_rows, rows_per_part)):
        path = posixpath.join(store.embeddings_dir(shard), f"{BASE_PREFIX}{name}-{i:05d}.parquet")
        store.write_parquet(table.slice(start, rows_per_part), path, row_group_size=65_536)
        out.append(store.relative(path))
    return out


# ---- the one build path -------------------------------------------------------------------------
def build_shard(
    store: Store,
    shard: int,
    options: RebuildOptions | None = None,
    *,
    on_stage: Stage | None = None,
) -> ShardBuildResult | None:
    """Build (not commit) the next version of ``shard``; None when it is already up to date.
    ``on_stage`` hears "read" once the rows, tombstones and live quantizer are read, then the
    build's stages (``index.ann.build.build_arrays``)."""
    options = options or RebuildOptions()
    t0 = time.perf_counter()
    manifest = load_manifest(store)
    if manifest is None:
        raise ValueError(f"{store} has no manifest: embed some images first")
    plan = plan_shard(store, shard, manifest)
    if plan.up_to_date and not options.force:
        return None
    tombstones = read_tombstones(store, plan)
    table = read_rows(store, plan, manifest.dim)
    read_count = table.num_rows
    table, dropped = read_visible(table, tombstones)
    transform = load_transform(store, manifest)  # None: indexed in the model's space
    vectors = _indexed(schema.arrow_to_vectors(table[schema.EMBEDDING]), transform)
    dim = manifest.dim if transform is None else transform.out_dim
    n_base = len(base_parts_of(plan.meta))
    new_vectors = (
        _indexed(_rows_of_parts(store, plan.new_parts, manifest.dim), transform)
        if n_base
        else vectors
    )
    trained, spec, reason = drift_decision(
        store, plan, new_vectors, len(vectors), dim, manifest.metric, options
    )
    log.info("shard %d: %s", shard, reason)
    if on_stage is not None:
        on_stage("read")  # every input is read (rows, tombstones, the live quantizer)
    version = next_version(store, shard, plan.state)
    name = new_version_name(version)
    local = staging_dir(store, shard)
    try:
        keep = newest_deletes(tombstones)
        if keep is not None and options.tombstone_keep_s is not None:
            cutoff = pa.scalar(int((time.time() - options.tombstone_keep_s) * 1000), pa.int64())
            keep = keep.filter(pc.greater_equal(keep[schema.DELETED_AT].cast(pa.int64()), cutoff))
        if keep is not None:
            pq.write_table(keep, local / TOMBSTONES_FILE, compression="zstd")
        base_parts = write_base_parts(
            store, shard, name, table, parse_bytes(options.base_part_bytes)
        )
        core = (schema.ID, schema.URI, schema.EMBEDDING)
        table = _typed_metadata(table, manifest.metadata)
        extra_columns = [c for c in table.column_names if c not in core]
        meta = build_arrays(
            vectors,
            table[schema.ID].combine_chunks(),
            table[schema.URI].combine_chunks(),
            local,
            spec,
            manifest.metric,
            extra=table.select(extra_columns).combine_chunks() if extra_columns else None,
            memory_budget=options.memory_budget,
            seed=options.seed,
            tune=options.tune,
            on_stage=on_stage,
            trained=trained,
            extra_meta={
                "shard": shard,
                "version": version,
                "dir": name,
                # the live version this build read (None: none yet); the commit needs it live
                "parent": plan.state.dir,
                "model": manifest.model_tag,
                "transform": manifest.transform,  # the space its vectors are in (None: model's)
                "metadata": {c: t for c, t in manifest.metadata.items() if c in extra_columns},
                "base_parts": base_parts,
                # every part-* listed: its rows are in the base parts now (read from the live
                # version's base parts, or from the part itself when new)
                "parts": plan.parts,
                "tombstone_parts": plan.tombstone_parts,
                "rows_read": read_count,
                "duplicates_dropped": dropped,
                "read_seconds": round(time.perf_counter() - t0, 3),
                "rebuild": {"retrained": trained is None, "reason": reason},
            },
        )
        publish(store, shard, local, name)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return ShardBuildResult(shard, version, name, meta["count"], meta)


def rebuild_shard(
    store: Store | str,
    shard: int,
    options: RebuildOptions | None = None,
    *,
    on_stage: Stage | None = None,
) -> dict:
    """Build ``shard`` if it is out of date (or ``force``) and commit it; returns a summary
    ``{"shard", "built", "version", "dir", "live", "count", "retrained", "reason", "seconds"}``.

    A build superseded by another's commit (its parent is no longer live) is discarded and the
    shard planned again, up to ``options.commit_attempts`` builds, as is one whose inputs
    vanished (``FileNotFoundError``) because the live version changed and GC retired them; the
    summary then says ``"superseded": true`` (with ``"built": false`` when none committed:
    ``"reason"`` is then "up to date" or says which version superseded it)."""
    options = options or RebuildOptions()
    faiss.omp_set_num_threads(options.threads)  # the worker may be reused with another count
    store = Store(store) if isinstance(store, str) else store
    t0 = time.perf_counter()
    summary: dict = {"shard": shard, "built": False}
    superseded, discarded = False, []
    attempts = max(1, options.commit_attempts)
    for attempt in range(attempts):
        before = _live_dir(store, shard)
        try:
            result = build_shard(store, shard, options, on_stage=on_stage)
        except FileNotFoundError as e:
            # GC removed what this build was reading, after another build made it old
            now_live = _live_dir(store, shard)
            if now_live == before or attempt == attempts - 1:
                raise
            log.warning(
                "shard %d: %s went while it was read (%s live now); planning again",
                shard,
                e,
                now_live,
            )
            superseded = True
            continue
        if result is None:
            state = load_manifest(store).shards[shard]
            summary.update(version=state.version, dir=state.dir, reason="up to date")
            break
        manifest = commit_results(store, [result])
        live = manifest.shards[shard]
        if committed(manifest, result):
            summary.update(
                built=True,
                version=result.version,
                dir=result.dir,
                live=live.dir,
                count=result.count,
                retrained=result.meta["rebuild"]["retrained"],
                reason=result.meta["rebuild"]["reason"],
                build_seconds=result.meta["build_seconds"],
            )
            break
        discard(store, result)
        superseded = True
        discarded.append(result.dir)
        log.warning(
            "shard %d: build %s (from %s) superseded by %s; planning again",
            shard,
            result.dir,
            result.meta.get("parent"),
            live.dir,
        )
        summary.update(
            version=live.version,
            dir=live.dir,
            live=live.dir,
            reason=f"superseded: {live.dir} became live while {result.dir} was built",
        )
    if superseded:
        summary.update(superseded=True, discarded=discarded)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _live_dir(store: Store, shard: int) -> str | None:
    manifest = load_manifest(store)
    state = manifest.shards.get(shard) if manifest is not None else None
    return None if state is None else state.dir


def _typed_metadata(table: pa.Table, columns: dict[str, str]) -> pa.Table:
    """The metadata columns in their schema types (parts are written in them; this keeps a part
    written before a column was widened from int to float from changing rows.parquet's type)."""
    for name, kind in columns.items():
        if name in table.column_names and table[name].type != TYPES[kind]:
            i = table.column_names.index(name)
            table = table.set_column(i, pa.field(name, TYPES[kind]), table[name].cast(TYPES[kind]))
    return table


def _indexed(vectors: np.ndarray, transform: Transform | None) -> np.ndarray:
    """Rows as the store indexes them: through its transform, when it has one."""
    return vectors if transform is None else transform.apply(vectors)


def _rows_of_parts(store: Store, parts: list[str], dim: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, dim), np.float32)
    table = store.read_parquet([store.path(p) for p in parts], columns=[schema.EMBEDDING])
    return schema.arrow_to_vectors(table[schema.EMBEDDING])
