"""Build one shard's index version: Parquet parts -> an immutable ``vNNNNNN/`` directory.

A version directory holds ``index.faiss`` (int64 row keys 0..n-1 -> codes), ``rows.parquet``
(row key -> id, uri, metadata), ``vectors.npy`` (float16, memory-mapped for rerank) and
``meta.json`` (the IndexSpec, sizes, timings, parts covered and a checksum of every file).

Visibility: nothing is live until the manifest names it. On a local store the version is built
under a hidden ``.tmp-*`` name and renamed into place, so a crash never leaves a ``vNNNNNN``
directory that is half written. Object stores have no rename: files are uploaded into
``vNNNNNN/`` (``meta.json`` last) and only the manifest commit makes the version visible; a crash
leaves an unreferenced directory that the next build skips over (version numbers only grow) and
that ``ShardIndex.load`` refuses by checksum if asked for explicitly.

Rows are ordered by id (duplicates of an id keep the newest ``ingested_at``), so the same data
gives the same row keys whatever order the parts were listed or written in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index import schema
from index.manifest import Manifest, ShardState, commit_manifest, load_manifest
from index.policy import IndexSpec, choose_index
from index.store import Store
from index.tune import tune_defaults

META_FORMAT = 1
INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
VECTORS_FILE = "vectors.npy"
META_FILE = "meta.json"
DATA_FILES = (ROWS_FILE, VECTORS_FILE, INDEX_FILE)
KEY = "key"
ADD_CHUNK = 65_536
STALE_TMP_SECONDS = 3600
_VERSION_RE = re.compile(r"^v(\d{6})$")

Stage = Callable[[str], None]


class ShardBuildResult(NamedTuple):
    """What a build produced; ``commit_results`` turns it into the shard's manifest state."""

    version: int
    parts: list[str]
    count: int
    meta: dict


def faiss_metric(metric: str) -> int:
    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")


def build_arrays(
    vectors: np.ndarray,
    ids: Sequence[str] | pa.Array,
    uris: Sequence[str] | pa.Array,
    out_dir: str | os.PathLike[str],
    spec: IndexSpec | None,
    metric: str,
    *,
    extra: pa.Table | None = None,
    memory_budget: str | int = "4G",
    seed: int = 0,
    tune: bool = True,
    extra_meta: dict | None = None,
    on_stage: Stage | None = None,
    trained: faiss.Index | None = None,
) -> dict:
    """Write a complete version directory for these rows into the local directory ``out_dir``.

    Row key ``i`` is row ``i`` of the arrays. ``spec=None`` applies the policy rules.
    ``extra`` (same length) holds metadata columns stored in ``rows.parquet``. ``tune`` measures
    the built index for its default nprobe and rerank candidates (``index.tune``); without it
    the spec's defaults stand. ``on_stage`` is called with "rows", "trained", "added", "tuned"
    and "index" as each step finishes (progress reports;
    the crash tests use it to stop a build at a known point). ``trained`` is an already trained
    index of ``spec``'s structure (a rebuild reusing the live version's quantizer and codebooks,
    ``pipelines.rebuild``): it is copied, emptied and filled, with no training. Returns the meta
    dict written.
    """
    t0 = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected (n, dim) vectors, got shape {vectors.shape}")
    n, dim = vectors.shape
    if len(ids) != n or len(uris) != n or (extra is not None and extra.num_rows != n):
        raise ValueError("ids, uris, extra and vectors must have the same number of rows")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinity")
    spec = spec or choose_index(n, dim, metric, memory_budget)
    stage = on_stage or (lambda _name: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    columns = {KEY: pa.array(np.arange(n, dtype=np.int64)), schema.ID: ids, schema.URI: uris}
    rows = pa.table(
        {k: v if isinstance(v, pa.Array) else pa.array(v, pa.string()) for k, v in columns.items()}
    )
    if extra is not None:
        for name in extra.column_names:
            rows = rows.append_column(extra.schema.field(name), extra[name])
    pq.write_table(rows, out / ROWS_FILE, compression="zstd")
    vectors16 = vectors.astype(np.float16)
    _save_npy(out / VECTORS_FILE, vectors16)
    stage("rows")

    if trained is not None:
        index = faiss.clone_index(trained)
        index.reset()  # keeps the coarse quantizer and PQ codebooks, drops the codes
    else:
        index = faiss.index_factory(dim, spec.factory, faiss_metric(metric))
    t_train = time.perf_counter()
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(spec.train_size, n), replace=False))
        index.train(vectors[sample])
    train_s = time.perf_counter() - t_train
    stage("trained")

    t_add = time.perf_counter()
    for start in range(0, n, ADD_CHUNK):
        block = vectors[start : start + ADD_CHUNK]
        if spec.kind == "flat":
            index.add(block)  # flat ids are positions, which are the row keys
        else:
            index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    add_s = time.perf_counter() - t_add
    stage("added")

    tuning = tune_defaults(index, vectors, vectors16, metric, spec, seed=seed) if tune else None
    del vectors16
    if tuning is not None:
        spec = dataclasses.replace(
            spec,
            nprobe=tuning["nprobe"],
            candidates=tuning["candidates"],
            reasons=[*spec.reasons, tuning["reason"]],
        )
    stage("tuned")

    faiss.write_index(index, str(out / INDEX_FILE))
    _fsync(out / INDEX_FILE)
    stage("index")

    meta = {
        "format": META_FORMAT,
        "kind": spec.kind,
        "factory": spec.factory,
        "metric": metric,
        "dim": dim,
        "count": n,
        "nlist": spec.nlist,
        "pq_m": spec.pq_m,
        "nbits": spec.nbits,
        "train_size": min(spec.train_size, n) if spec.kind != "flat" else 0,
        "nprobe": spec.nprobe,
        "candidates": spec.candidates,
        "spec": spec.to_dict(),
        "tuning": tuning,
        "seed": seed,
        "faiss_version": faiss.__version__,
        "created_at": time.time(),
        "build_seconds": {
            "train": round(train_s, 3),
            "add": round(add_s, 3),
            "tune": tuning["seconds"] if tuning else 0.0,
            "total": round(time.perf_counter() - t0, 3),
        },
        "files": {name: file_digest(out / name) for name in DATA_FILES},
        **(extra_meta or {}),
    }
    _write_json(out / META_FILE, meta)  # last: a directory without it is not a version
    return meta


def build_shard(
    store: Store,
    shard: int,
    *,
    memory_budget: str | int = "4G",
    spec: IndexSpec | None = None,
    seed: int = 0,
    force: bool = False,
    on_stage: Stage | None = None,
    parts: list[str] | None = None,
    deleted: dict[str, int] | None = None,
    trained: faiss.Index | None = None,
    extra_meta: dict | None = None,
) -> ShardBuildResult | None:
    """Build a new version of ``shard`` from all its Parquet parts, if any are new.

    Returns None (a no-op) when the live version already covers exactly the shard's parts and
    ``force`` is false. The new version is complete and immutable when this returns, but is not
    live until ``commit_results`` puts it in the manifest. A shard with no rows yet gets an empty
    flat version, so every shard of a store can be loaded and served.

    For background rebuilds (``pipelines.rebuild``): ``parts`` fixes the parts to read (default:
    all listed now); ``deleted`` (id -> deleted_at in ms, from tombstones) drops rows whose id was
    deleted at or after their ``ingested_at``; ``trained`` reuses a trained index (see
    ``build_arrays``); ``extra_meta`` is recorded in ``meta.json``.
    """
    manifest = load_manifest(store)
    if manifest is None:
        raise ValueError(f"{store} has no manifest: embed some images first")
    if not 0 <= shard < manifest.num_shards:
        raise ValueError(f"shard {shard} out of range for {manifest.num_shards} shards")
    state = manifest.shards[shard]
    parts = store.list_parts(shard) if parts is None else sorted(parts)
    if not force and state.version is not None and sorted(state.parts) == parts:
        return None

    t0 = time.perf_counter()
    vectors, ids, uris, extra, dropped = read_shard(store, manifest, parts, deleted=deleted)
    _clean_stale_tmp(store, shard)
    extra_meta = {
        "shard": shard,
        "parts": parts,
        "model": manifest.model_tag,
        "duplicates_dropped": dropped,
        "read_seconds": round(time.perf_counter() - t0, 3),
        **(extra_meta or {}),
    }
    version = _next_version(store, shard, state)

    def build_into(out_dir: str | os.PathLike[str]) -> dict:
        return build_arrays(
            vectors,
            ids,
            uris,
            out_dir,
            spec,
            manifest.metric,
            extra_meta={**extra_meta, "version": version},
            extra=extra,
            memory_budget=memory_budget,
            seed=seed,
            on_stage=on_stage,
            trained=trained,
        )

    if store.is_local:
        tmp = Path(store.shard_index_dir(shard)) / f".tmp-v{version:06d}-{uuid.uuid4().hex[:8]}"
        try:
            meta = build_into(tmp)
            version = _rename_into_place(store, shard, tmp, version, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        with tempfile.TemporaryDirectory(prefix="vs-build-") as tmp:
            meta = build_into(tmp)
            target = store.index_version_dir(shard, version)
            for name in (*DATA_FILES, META_FILE):  # meta.json last
                store.fs.put_file(os.path.join(tmp, name), posixpath.join(target, name))
    return ShardBuildResult(version, parts, meta["count"], meta)


def read_shard(
    store: Store,
    manifest: Manifest,
    parts: list[str],
    deleted: dict[str, int] | None = None,
) -> tuple[np.ndarray, pa.Array, pa.Array, pa.Table | None, int]:
    """All rows of these parts ordered by id, one row per id (the newest ``ingested_at``).

    ``deleted`` (id -> deleted_at ms) drops the kept row of an id deleted at or after its
    ``ingested_at`` (the tombstone rule of ``index.delta``; counted with the duplicates).
    Returns (float32 vectors, ids, uris, metadata columns or None, duplicates dropped).
    """
    if not parts:
        empty = pa.array([], pa.string())
        return np.zeros((0, manifest.dim), np.float32), empty, empty, None, 0
    table = store.read_parquet([store.path(p) for p in parts])
    keys = [(schema.ID, "ascending")]
    if schema.INGESTED_AT in table.column_names:
        keys.append((schema.INGESTED_AT, "descending"))
    table = table.take(pc.sort_indices(table, sort_keys=keys))
    ids = table[schema.ID].combine_chunks()
    keep = np.ones(len(ids), dtype=bool)
    if len(ids) > 1:
        keep[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    if deleted:
        keep &= _not_deleted(table, deleted)
    dropped = int((~keep).sum())
    if dropped:
        table = table.filter(pa.array(keep))
    vectors = schema.arrow_to_vectors(table[schema.EMBEDDING])
    if vectors.shape[1] != manifest.dim:
        raise ValueError(f"parts hold {vectors.shape[1]}-d vectors, manifest says {manifest.dim}")
    rest = [c for c in table.column_names if c not in (schema.ID, schema.URI, schema.EMBEDDING)]
    extra = table.select(rest).combine_chunks() if rest else None
    return (
        vectors,
        table[schema.ID].combine_chunks(),
        table[schema.URI].combine_chunks(),
        extra,
        dropped,
    )


def _not_deleted(table: pa.Table, deleted: dict[str, int]) -> np.ndarray:
    """False for rows whose id has a tombstone at or after the row's ``ingested_at``."""
    ids = table[schema.ID]
    hit = pc.is_in(ids, value_set=pa.array(list(deleted), pa.string()))
    hit = np.asarray(hit.to_numpy(zero_copy_only=False), dtype=bool)
    out = np.ones(len(hit), dtype=bool)
    rows = np.flatnonzero(hit)
    if len(rows) == 0:
        return out
    if schema.INGESTED_AT in table.column_names:
        ts = table[schema.INGESTED_AT].take(pa.array(rows)).cast(schema.TIMESTAMP)
        ingested = ts.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    else:
        ingested = np.zeros(len(rows), np.int64)
    row_ids = ids.take(pa.array(rows)).to_pylist()
    for row, row_id, t in zip(rows, row_ids, ingested, strict=True):
        if deleted[row_id] >= int(t):
            out[row] = False
    return out


def apply_results(manifest: Manifest, results: Sequence[ShardBuildResult]) -> Manifest:
    """Pure manifest update: make each result its shard's live version, unless the manifest
    already names a newer one (a concurrent build won; never go back)."""
    for r in results:
        shard = r.meta["shard"]
        current = manifest.shards.get(shard) or ShardState()
        if current.version is not None and current.version >= r.version:
            continue
        manifest.shards[shard] = ShardState(
            version=r.version, parts=list(r.parts), count=r.count, built_at=r.meta["created_at"]
        )
    return manifest


def commit_results(store: Store, results: Sequence[ShardBuildResult]) -> Manifest:
    """Make built versions live with one manifest commit (optimistic, retried on races)."""

    def update(manifest: Manifest | None) -> Manifest:
        if manifest is None:
            raise ValueError(f"{store} has no manifest")
        return apply_results(manifest, results)

    return commit_manifest(store, update)


def list_versions(store: Store, shard: int) -> list[int]:
    """Version numbers that have a directory (live, old, or orphaned by a crashed upload)."""
    names = store.ls(store.shard_index_dir(shard))
    return sorted(int(m.group(1)) for m in map(_VERSION_RE.match, names) if m)


def file_digest(path: str | os.PathLike[str]) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": os.path.getsize(path), "sha256": digest}


def _next_version(store: Store, shard: int, state: ShardState) -> int:
    """Never reuse a number: not the live one, nor one a crashed build left behind."""
    return max([state.version or 0, *list_versions(store, shard)]) + 1


def _rename_into_place(store: Store, shard: int, tmp: Path, version: int, meta: dict) -> int:
    """Atomically publish the directory; if a concurrent build took the number, take the next."""
    for _ in range(100):
        final = Path(store.index_version_dir(shard, version))
        try:
            os.rename(tmp, final)  # fails if ``final`` exists and is not empty
        except OSError:
            if not final.exists():
                raise
            version = max(version, *list_versions(store, shard)) + 1
            meta["version"] = version
            _write_json(tmp / META_FILE, meta)
            continue
        _fsync_dir(final.parent)
        return version
    raise RuntimeError(f"could not find a free version number for shard {shard}")


def _clean_stale_tmp(store: Store, shard: int) -> None:
    """Remove ``.tmp-*`` directories of builds that died long ago (never a running one's)."""
    if not store.is_local:
        return
    base = Path(store.shard_index_dir(shard))
    if not base.exists():
        return
    now = time.time()
    for child in base.iterdir():
        if child.name.startswith(".tmp-") and now - child.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(child, ignore_errors=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, body: dict) -> None:
    with open(path, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
