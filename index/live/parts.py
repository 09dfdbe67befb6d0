"""The files a live shard is read from besides its base version: delta parts and tombstones.

Writers (``POST /images``, ``DELETE /images``: ``serve.writes``) add rows to a shard by writing
a new ``part-*.parquet`` under ``embeddings/shard=NNNNN/`` and delete them by writing a part of
``(id, deleted_at)`` rows under ``tombstones/shard=NNNNN/``; parts are immutable and written
atomically and durably (``Store.write_parquet``), so a reader either sees a whole part or none.
``index.live.delta.LiveShard`` reads them back with ``read_rows`` and ``read_tombstones``, several
at a time and each on its own (``read_each``); the rebuild (``index.live.rebuild``) folds them
into the next version.
"""

from __future__ import annotations

import posixpath
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.rows import schema
from index.rows.metadata import metadata_columns
from index.rows.visibility import ms_of
from index.storage.store import PARALLEL_READS, Store


def part_name(kind: str, ms: int) -> str:
    """``part-<kind>-<ms>-<random>.parquet``: unique, sorts by time, and never equal to the
    embedding job's ``part-<hash of ids>.parquet`` names."""
    return f"part-{kind}-{ms:013d}-{uuid.uuid4().hex[:12]}.parquet"


def write_rows(store: Store, shard: int, table: pa.Table) -> str:
    """Write an embeddings table (``schema.embeddings_table``) as a new part of ``shard``,
    atomically and durably (fsync on a local store); returns its relative path."""
    path = posixpath.join(store.embeddings_dir(shard), part_name("api", int(time.time() * 1000)))
    store.write_parquet(table, path)
    return store.relative(path)


def write_tombstones(
    store: Store, shard: int, ids: list[str], deleted_at_ms: int | None = None
) -> tuple[str, int]:
    """Durably delete ``ids`` of ``shard`` (at ``deleted_at_ms``, default now); returns
    (relative part path, deleted_at ms)."""
    ts = schema.now_ms() if deleted_at_ms is None else pa.scalar(deleted_at_ms, schema.TIMESTAMP)
    ms = int(ts.value)
    path = posixpath.join(store.tombstones_dir(shard), part_name("del", ms))
    store.write_parquet(schema.tombstones_table(ids, ts), path)
    return store.relative(path), ms


def read_tombstones(store: Store | None, path: str) -> tuple[list[str], np.ndarray]:
    """(ids, deleted_at ms) of a tombstone part (relative to ``store``), or of a local file
    (``store`` None: a version's ``tombstones.parquet`` in its local directory)."""
    table = pq.read_table(path) if store is None else store.read_table(store.path(path))
    return table[schema.ID].to_pylist(), ms_of(table[schema.DELETED_AT])


def read_rows(
    store: Store, part: str
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, pa.Table | None]:
    """(ids, uris, float32 vectors, ingested_at ms, metadata columns or None) of one part."""
    table = store.read_table(store.path(part))
    meta = metadata_columns(table.column_names)
    return (
        table[schema.ID].to_pylist(),
        table[schema.URI].to_pylist(),
        schema.arrow_to_vectors(table[schema.EMBEDDING]),
        ms_of(table[schema.INGESTED_AT]),
        table.select(meta) if meta else None,
    )


def read_each(
    store: Store, parts: list[str], read: Callable, failed: dict[str, str]
) -> list[tuple[str, tuple]]:
    """``(part, read(store, part))`` of each part that reads, in order, ``PARALLEL_READS`` at
    a time (a replica starting on an object store has many small parts, each a round trip);
    each part that cannot be read goes to ``failed`` (part -> why) alone."""

    def one(part: str) -> tuple[str, tuple | None, str | None]:
        try:
            return part, read(store, part), None
        except Exception as e:  # noqa: BLE001 (one part's problem, whatever it is)
            return part, None, f"{type(e).__name__}: {e}"

    if len(parts) > 1:
        with ThreadPoolExecutor(min(PARALLEL_READS, len(parts)), "read-part") as pool:
            done = list(pool.map(one, parts))
    else:
        done = [one(part) for part in parts]
    failed.update((part, why) for part, _, why in done if why is not None)
    return [(part, got) for part, got, why in done if why is None]
