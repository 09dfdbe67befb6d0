"""Loading one version of a shard: which directory, fetched where, checked how.

A version is refused whole, never half-used (``IndexLoadError``): ``meta.json`` must be
readable, every file present with the size it records (and, with ``verify``, its SHA-256:
``index.storage.versions``), the FAISS index must hold ``count x dim`` as ``meta.json`` says,
``vectors.npy`` must be float16 of that shape (it is memory-mapped, not read), and
``rows.parquet`` must map keys 0..count-1 (``index.ann.row_table``).

On an object store the directory is copied into the node cache first
(``index.storage.cache``); a cached copy that fails the check is dropped and fetched once more,
so a corrupt copy is never trusted forever. ``index.ann.shard_index.ShardIndex`` is built from
what this returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from index.ann.row_table import RowTable, read_row_table
from index.storage.manifest import load_manifest
from index.storage.publish import list_versions
from index.storage.store import Store
from index.storage.versions import (
    INDEX_FILE,
    ROWS_FILE,
    VECTORS_FILE,
    IndexLoadError,
    check_version_dir,
    version_number,
)


@dataclass(frozen=True)
class LoadedVersion:
    """The parts of one checked version directory."""

    directory: Path
    meta: dict
    index: faiss.Index
    rows: RowTable
    vectors: np.ndarray  # float16 (count, dim), memory-mapped
    # seconds: fetch_s (copy into the node cache; 0 on a local store), verify_s (sizes and
    # SHA-256s), open_s (the FAISS index, the row table, the vectors' mapping)
    timings: dict = field(default_factory=dict)


def resolve_version(store: Store, shard: int, version: str | int | None) -> str:
    """A version directory name from a name, a number (the listed directory with it) or None
    (the live one the manifest names)."""
    if isinstance(version, str):
        return version
    if version is None:
        manifest = load_manifest(store)
        if manifest is None:
            raise IndexLoadError(f"{store} has no manifest")
        state = manifest.shards.get(shard)
        if state is None or state.dir is None:
            raise IndexLoadError(f"shard {shard} of {store} has no live index version")
        return state.dir
    names = [n for n in list_versions(store, shard) if version_number(n) == int(version)]
    if not names:
        raise IndexLoadError(f"shard {shard} of {store} has no version {version}")
    return names[0]


def fetch_version(store: Store, shard: int, name: str, *, verify: bool = True) -> LoadedVersion:
    """Version directory ``name`` of ``shard``, copied to this node if the store is remote,
    checked and opened (a bad cached copy is fetched once more)."""
    remote = store.index_version_dir(shard, name)
    if not store.exists(remote):
        raise IndexLoadError(f"index version {remote} does not exist")
    for attempt in (1, 2):
        start = time.perf_counter()
        try:
            directory = store.local_dir(remote)
        except (OSError, FileNotFoundError) as e:
            raise IndexLoadError(f"could not fetch {remote}: {e}") from e
        fetched = time.perf_counter() - start
        try:
            loaded = open_version(directory, verify=verify)
            loaded.timings["fetch_s"] = round(fetched, 3)
            return loaded
        except IndexLoadError:
            if store.is_local or attempt == 2:
                raise
            store.evict_local(remote)  # a bad copy in the cache: fetch it again
    raise AssertionError("unreachable")


def open_version(directory: str | Path, *, verify: bool = True) -> LoadedVersion:
    """A version directory on the local filesystem, checked and opened."""
    directory = Path(directory)
    start = time.perf_counter()
    meta = check_version_dir(directory, verify)
    checked = time.perf_counter()
    try:
        index = faiss.read_index(str(directory / INDEX_FILE))
    except RuntimeError as e:
        raise IndexLoadError(f"{directory / INDEX_FILE}: unreadable FAISS index: {e}") from e
    count, dim = int(meta["count"]), int(meta["dim"])
    if index.ntotal != count or index.d != dim:
        raise IndexLoadError(
            f"{directory}: index holds {index.ntotal} x {index.d}-d, meta says {count} x {dim}"
        )
    try:
        vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise IndexLoadError(f"{directory / VECTORS_FILE}: {e}") from e
    if vectors.shape != (count, dim) or vectors.dtype != np.float16:
        raise IndexLoadError(f"{directory / VECTORS_FILE}: {vectors.shape} {vectors.dtype}")
    rows = read_row_table(directory / ROWS_FILE, count)
    timings = {
        "fetch_s": 0.0,
        "verify_s": round(checked - start, 3),
        "open_s": round(time.perf_counter() - checked, 3),
    }
    return LoadedVersion(directory, meta, index, rows, vectors, timings)
