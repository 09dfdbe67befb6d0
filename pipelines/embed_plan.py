"""What an embedding run still has to do, worked out with memory that does not grow with the
catalogue, and handed to Ray Data as shard-ordered blocks.

The driver never holds every input URI or every stored id at once:

1. Inputs are streamed (``pipelines.inputs.iter_inputs``) in chunks; each chunk's ``(uri, id)``
   rows are appended to one local Arrow file per shard (``ShardSpill``), on disk.
2. One shard at a time: its inputs are read back; inputs recorded as failed by an earlier run
   are dropped (unless ``--retry-errors``), then those whose id the shard already stores (the
   ``id`` column of its parts and base parts) or deleted (``deleted_ids``: a deleted image is
   not new), then repeats of an id, with Arrow set operations.
   What is left is written to the store as a staging file, ``_staging/embed-<run>/shard=S.parquet``
   (row groups of ``block_rows``), so workers on any node can read it.
3. The job's dataset is ``ray.data.range(blocks)``: block ``b`` reads row group ``b`` of the
   staging files (``PendingInputs.locate``). Blocks come in shard order, so the write stage's
   batches (``part_rows`` rows) hold one or two shards and each shard gets parts of
   ``part_rows`` rows, MBs, not one tiny part per shard per batch.

With a metadata sidecar (``pipelines.sidecar``) each shard's staged rows are joined, by URI, with
that shard's sidecar rows, so the staging files carry the rows' typed metadata columns through
the dataset to the parts.

Deletes that land while the job runs: the plan reads deletes once, so every row the job writes
is stamped with the plan's time (``PendingInputs.planned_at``, taken before the deletes are
read), not the time its part is written. A DELETE that arrives after the plan has a newer
``deleted_at`` than every row of the job and hides it (``index.rows.visibility`` rule 2) in
every replica and every rebuild, however late the part lands; a Ray Data retry that rewrites a
part writes the same stamp.

**A routed store** (``index.ann.routing``: a row's shard is its vector's, so an id may be stored
in any shard): the inputs are still spilled and planned by their id's hash shard (a *bucket*
here; the sidecar is spilled the same way), and the stored and deleted ids of every shard are
first spilled into the same per-bucket local files (``RoutedIds``), so each bucket's inputs are
compared with every id stored or deleted anywhere that hashes to it: memory stays one bucket's.

Peak driver memory is one chunk of inputs plus one shard's inputs and stored ids (Arrow arrays,
~30 bytes a row), not a Python object per catalogue row. ``--dedup`` (content ids) needs the
bytes first: the inputs are staged as plain URI files, hashed in Ray tasks, and the ``(uri,
id)`` rows streamed back into the spill.
"""

from __future__ import annotations

import bisect
import os
import posixpath
import shutil
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index.rows import clock, schema
from index.rows.sharding import shards_of
from index.storage.manifest import Manifest, ShardState, load_manifest
from index.storage.store import Store
from index.storage.versions import TOMBSTONES_FILE

STAGING = "_staging"
STALE_STAGING_S = 24 * 3600
CHUNK = 16_384  # inputs per spill chunk (and stored ids per read batch)
_SPILL_SCHEMA = pa.schema([(schema.URI, pa.string()), (schema.ID, pa.string())])


@dataclass
class PlanCounts:
    inputs: int = 0
    skipped_present: int = 0
    skipped_failed: int = 0
    duplicates: int = 0  # the same id twice among the inputs (--dedup: the same bytes)
    deferred: int = 0  # left for a later run by --limit
    pending: int = 0
    store_duplicates: int = 0  # ids stored more than once before this run (should stay 0)


class Spill:
    """Arrow rows routed to one local stream file per integer key (on disk, not in memory)."""

    def __init__(self, schema: pa.Schema, directory: str | None = None, prefix: str = "spill"):
        self.schema = schema
        self.dir = tempfile.mkdtemp(prefix=f"vs-embed-{prefix}-", dir=directory)
        self._writers: dict[int, pa.RecordBatchStreamWriter] = {}
        self._files: dict[int, object] = {}
        self.counts: dict[int, int] = {}

    def _path(self, key: int) -> str:
        return os.path.join(self.dir, f"{key:06d}.arrows")

    def add(self, key: int, table: pa.Table) -> None:
        if key not in self._writers:
            f = open(self._path(key), "wb")  # noqa: SIM115
            self._files[key] = f
            self._writers[key] = pa.ipc.new_stream(f, self.schema)
        self._writers[key].write_table(table)
        self.counts[key] = self.counts.get(key, 0) + table.num_rows

    def route(self, table: pa.Table, keys: np.ndarray) -> None:
        """Each row of ``table`` to the file of its key."""
        for key in np.unique(keys):
            self.add(int(key), table.filter(pa.array(keys == key)))

    def finish(self) -> None:
        for writer in self._writers.values():
            writer.close()
        for f in self._files.values():
            f.close()
        self._writers, self._files = {}, {}

    def keys(self) -> list[int]:
        return sorted(self.counts)

    def read(self, key: int) -> pa.Table:
        if key not in self.counts:
            return self.schema.empty_table()
        with pa.memory_map(self._path(key)) as source:
            return pa.ipc.open_stream(source).read_all()

    def batches(self, key: int):
        """The rows of ``key`` a record batch at a time (streamed, for large files)."""
        with pa.memory_map(self._path(key)) as source:
            yield from pa.ipc.open_stream(source)

    def close(self) -> None:
        self.finish()
        shutil.rmtree(self.dir, ignore_errors=True)


class ShardSpill(Spill):
    """(uri, id) rows routed to one local file per shard."""

    def __init__(self, num_shards: int, directory: str | None = None):
        super().__init__(_SPILL_SCHEMA, directory, "spill")
        self.num_shards = num_shards

    def add_rows(self, uris: list[str], ids: list[str]) -> None:
        if uris:
            table = pa.table({schema.URI: uris, schema.ID: ids}, schema=_SPILL_SCHEMA)
            self.route(table, shards_of(ids, self.num_shards))

    def shards(self) -> list[int]:
        return self.keys()


def bucket_of(ids: list[str], buckets: int) -> np.ndarray:
    """A bucket per id (CRC-32, independent of the shard hash) for the per-shard anti-join."""
    return np.fromiter((zlib.crc32(i.encode()) % buckets for i in ids), np.int64, len(ids))


@dataclass
class PendingInputs:
    """Staged inputs still to embed: ``files`` are (shard, store path, rows, row groups)."""

    staging: str  # the run's staging directory in the store
    block_rows: int
    files: list[tuple[int, str, int, int]] = field(default_factory=list)
    # ms: when the plan started, before it read the deletes; every row's ingested_at
    planned_at: int | None = None

    @property
    def rows(self) -> int:
        return sum(f[2] for f in self.files)

    @property
    def blocks(self) -> int:
        return sum(f[3] for f in self.files)

    def starts(self) -> list[int]:
        """First block number of each file (for ``locate``)."""
        out, total = [], 0
        for f in self.files:
            out.append(total)
            total += f[3]
        return out

    def locate(self, block: int, starts: list[int]) -> tuple[str, int]:
        """(store path, row group) of block number ``block``."""
        i = bisect.bisect_right(starts, block) - 1
        return self.files[i][1], block - starts[i]


def unique_by_id(table: pa.Table) -> pa.Table:
    """One row per id (sorted by id; which URI is kept among equal ids is the first in sort)."""
    if table.num_rows < 2:
        return table
    table = table.take(pc.sort_indices(table, sort_keys=[(schema.ID, "ascending")]))
    ids = table[schema.ID].combine_chunks()
    keep = np.ones(table.num_rows, dtype=bool)
    keep[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(keep))


def stored_parts(store: Store, shard: int) -> list[str]:
    """Every part and base part of ``shard``: the ids they hold are stored already."""
    return [store.path(p) for p in (*store.list_parts(shard), *store.list_base_parts(shard))]


def stored_ids(store: Store, shard: int) -> pa.Array:
    """The ``id`` column of every part and base part of ``shard`` (repeats included)."""
    parts = stored_parts(store, shard)
    if not parts:
        return pa.array([], pa.string())
    return store.read_parquet(parts, columns=[schema.ID])[schema.ID].combine_chunks()


def iter_stored_ids(store: Store, shard: int):
    """The same ids, a Parquet record batch at a time (flat memory for a large shard)."""
    yield from _iter_ids(store, stored_parts(store, shard))


def _iter_ids(store: Store, paths: list[str]):
    for path in paths:
        with store.fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=[schema.ID], batch_size=CHUNK):
                yield batch.column(0)


def tombstone_files(store: Store, shard: int, state: ShardState) -> list[str]:
    """``shard``'s tombstone parts and its live version's ``tombstones.parquet`` (the deletes
    it applied, kept after the parts are retired)."""
    paths = [store.path(p) for p in store.list_tombstone_parts(shard)]
    if state.dir is not None:
        version_file = posixpath.join(store.index_version_dir(shard, state.dir), TOMBSTONES_FILE)
        if store.exists(version_file):
            paths.append(version_file)
    return paths


def deleted_ids(store: Store, shard: int, state: ShardState) -> pa.Array:
    """Ids deleted in ``shard`` (``tombstone_files``). A deleted image is not new: re-running
    the job on its bucket does not bring it back."""
    paths = tombstone_files(store, shard, state)
    if not paths:
        return pa.array([], pa.string())
    return store.read_parquet(paths, columns=[schema.ID])[schema.ID].combine_chunks()


class RoutedIds:
    """A routed store's stored and deleted ids, from every shard, spilled to local files by
    their id's hash shard (the plan's buckets), so a bucket's inputs meet every stored copy."""

    def __init__(self, store: Store, manifest: Manifest, directory: str | None = None):
        id_schema = pa.schema([(schema.ID, pa.string())])
        self.stored = Spill(id_schema, directory, "routed-ids")
        self.deleted = Spill(id_schema, directory, "routed-deletes")
        try:
            for shard in range(manifest.num_shards):
                for ids in iter_stored_ids(store, shard):
                    self._route(self.stored, ids, manifest.num_shards)
                state = manifest.shards.get(shard, ShardState())
                for ids in _iter_ids(store, tombstone_files(store, shard, state)):
                    self._route(self.deleted, ids, manifest.num_shards)
        finally:
            self.stored.finish()
            self.deleted.finish()

    @staticmethod
    def _route(spill: Spill, ids: pa.Array, num_shards: int) -> None:
        if len(ids):
            table = pa.table({schema.ID: ids}, schema=spill.schema)
            spill.route(table, shards_of(ids.to_pylist(), num_shards))

    def stored_ids(self, bucket: int) -> pa.Array:
        return self.stored.read(bucket)[schema.ID].combine_chunks()

    def iter_stored_ids(self, bucket: int):
        if bucket in self.stored.counts:
            for batch in self.stored.batches(bucket):
                yield batch.column(0)

    def deleted_ids(self, bucket: int) -> pa.Array:
        """The bucket's deleted ids, each once: a delete in a routed store tombstones the id in
        every shard, so the copies are dropped a record batch at a time as they are read."""
        unique = pa.array([], pa.string())
        if bucket in self.deleted.counts:
            for batch in self.deleted.batches(bucket):
                unique = pc.unique(pa.concat_arrays([unique, batch.column(0)]))
        return unique

    def close(self) -> None:
        self.stored.close()
        self.deleted.close()


def failed_uris(store: Store) -> pa.Array:
    parts = store.list_error_parts()
    if not parts:
        return pa.array([], pa.string())
    return pc.unique(store.read_parquet(parts, columns=[schema.URI])[schema.URI].combine_chunks())


def new_staging(store: Store) -> str:
    """A fresh staging folder for this run; folders of runs that died a day ago are removed."""
    root = store.path(STAGING)
    now = time.time()
    for name in store.ls(root):
        started = name.split("-")[1] if name.startswith("embed-") else ""
        if started.isdigit() and now - int(started) > STALE_STAGING_S:
            store.rm(posixpath.join(root, name), recursive=True)
    return posixpath.join(root, f"embed-{int(now)}-{uuid.uuid4().hex[:8]}")


def plan_pending(
    store: Store,
    spill: ShardSpill,
    counts: PlanCounts,
    *,
    failed: pa.Array | None,
    limit: int | None,
    block_rows: int,
    sidecar=None,
    every_shard: bool = False,
) -> PendingInputs:
    """Per shard: inputs minus failed inputs, stored and deleted ids and repeats -> a staging
    file per shard, joined with their ``sidecar`` metadata (``pipelines.sidecar.Sidecar.join``;
    ``every_shard`` when ids are not routed by URI). A shard is worked through in buckets of at
    most ``BUCKET_ROWS`` inputs (its inputs and its stored ids both spilled by ``bucket_of``), so
    memory is flat whatever the shard's size. In a routed store the "shards" here are the ids'
    hash shards, compared with the ids stored anywhere (``RoutedIds``)."""
    # stamped before any delete is read: a delete the plan does not see is newer than the rows
    planned_at = clock.now_ms()
    pending = PendingInputs(staging=new_staging(store), block_rows=block_rows)
    pending.planned_at = planned_at
    manifest = load_manifest(store)
    states = manifest.shards if manifest is not None else {}
    routed = RoutedIds(store, manifest) if manifest and manifest.layout == "routed" else None
    try:
        for shard in spill.shards():
            if routed is None:
                deleted = deleted_ids(store, shard, states.get(shard, ShardState()))
            else:
                deleted = routed.deleted_ids(shard)
            staged = _stage_shard(
                store, spill, shard, routed, deleted, pending, counts, failed, limit, sidecar,
                every_shard,
            )  # fmt: skip
            if staged:
                pending.files.append(staged)
    finally:
        if routed is not None:
            routed.close()
    return pending


def _stage_shard(
    store, spill, shard, routed, deleted, pending, counts, failed, limit, sidecar, every_shard
) -> tuple[int, str, int, int] | None:
    """Stage one shard's new inputs (a bucket at a time); its ``PendingInputs.files`` entry."""
    path = posixpath.join(pending.staging, f"shard={shard:05d}.parquet")
    writer, rows = None, 0
    try:
        for table, present in _shard_buckets(store, spill, shard, routed):
            table = _new_inputs(table, present, deleted, failed, counts)
            if limit is not None:
                room = max(0, limit - counts.pending)
                counts.deferred += max(0, table.num_rows - room)
                table = table.slice(0, room)
            if table.num_rows == 0:
                continue
            if sidecar is not None:
                table = sidecar.join(table, shard, every_shard)
            if writer is None:  # (uri, id), and the store's metadata columns with a sidecar
                writer = pq.ParquetWriter(store.open_output(path), table.schema)
            writer.write_table(table, row_group_size=pending.block_rows)
            counts.pending += table.num_rows
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
            writer.where.close()  # the store file under it
    if not rows:
        return None
    with store.fs.open(path, "rb") as f:
        groups = pq.ParquetFile(f).metadata.num_row_groups
    return shard, path, rows, groups


BUCKET_ROWS = 16_384  # inputs per bucket: what the anti-join holds in memory at once


def _shard_buckets(store: Store, spill: ShardSpill, shard: int, routed: RoutedIds | None = None):
    """(inputs, stored ids) of ``shard``, a bucket at a time: the whole shard when it is small,
    else both sides spilled into ``ceil(inputs / BUCKET_ROWS)`` buckets by ``bucket_of``.
    ``routed``: the stored ids come from its spill of the ids hashing to ``shard``."""
    buckets = -(-spill.counts.get(shard, 0) // BUCKET_ROWS)
    if buckets <= 1:
        present = stored_ids(store, shard) if routed is None else routed.stored_ids(shard)
        yield spill.read(shard), present
        return
    id_schema = pa.schema([(schema.ID, pa.string())])
    inputs, stored = Spill(_SPILL_SCHEMA, prefix="in"), Spill(id_schema, prefix="ids")
    try:
        for batch in spill.batches(shard):
            table = pa.Table.from_batches([batch])
            inputs.route(table, bucket_of(table[schema.ID].to_pylist(), buckets))
        source = iter_stored_ids(store, shard) if routed is None else routed.iter_stored_ids(shard)
        for ids in source:
            table = pa.table({schema.ID: ids}, schema=id_schema)
            stored.route(table, bucket_of(ids.to_pylist(), buckets))
        inputs.finish()
        stored.finish()
        for bucket in inputs.keys():
            yield inputs.read(bucket), stored.read(bucket)[schema.ID].combine_chunks()
    finally:
        inputs.close()
        stored.close()


def _new_inputs(
    table: pa.Table, present: pa.Array, deleted: pa.Array, failed: pa.Array | None, counts
) -> pa.Table:
    """Drop failed inputs, then stored or deleted ids, then repeats of an id (counted)."""
    if failed is not None and len(failed):
        bad = pc.is_in(table[schema.URI], value_set=failed)
        counts.skipped_failed += pc.sum(bad).as_py() or 0
        table = table.filter(pc.invert(bad))
    counts.store_duplicates += len(present) - len(pc.unique(present))
    known = pa.concat_arrays([present, deleted]) if len(deleted) else present
    if len(known):
        there = pc.is_in(table[schema.ID], value_set=known)
        counts.skipped_present += pc.sum(there).as_py() or 0
        table = table.filter(pc.invert(there))
    unique = unique_by_id(table)  # after: an input already stored counts as present
    counts.duplicates += table.num_rows - unique.num_rows
    return unique


def stage_uris(store: Store, uri_chunks: Iterable[list[str]], block_rows: int) -> PendingInputs:
    """Plain input URIs as staging files (``--dedup``'s hashing pass reads them in tasks)."""
    pending = PendingInputs(staging=new_staging(store), block_rows=block_rows)
    for i, chunk in enumerate(uri_chunks):
        if not chunk:
            continue
        table = pa.table({schema.URI: pa.array(chunk, pa.string())})
        path = posixpath.join(pending.staging, f"inputs-{i:06d}.parquet")
        store.write_parquet(table, path, row_group_size=block_rows)
        pending.files.append((-1, path, len(chunk), -(-len(chunk) // block_rows)))
    return pending


def read_block(batch: dict, *, store: Store, pending: PendingInputs, starts: list[int]) -> pa.Table:
    """Ray Data stage: block numbers -> the staged rows of those blocks."""
    tables = []
    for block in np.asarray(batch["id"]).tolist():
        path, group = pending.locate(int(block), starts)
        with store.fs.open(path, "rb") as f:
            tables.append(pq.ParquetFile(f).read_row_group(group))
    return pa.concat_tables(tables)


def chunks(items: Iterable[str], size: int = CHUNK) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
