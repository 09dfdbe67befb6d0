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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index import schema
from index.manifest import ShardState, load_manifest
from index.sharding import shards_of
from index.store import Store
from index.versions import TOMBSTONES_FILE

STAGING = "_staging"
STALE_STAGING_S = 24 * 3600
CHUNK = 65_536  # inputs per spill chunk
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


class ShardSpill:
    """(uri, id) rows routed to one local Arrow stream file per shard."""

    def __init__(self, num_shards: int, directory: str | None = None):
        self.num_shards = num_shards
        self.dir = tempfile.mkdtemp(prefix="vs-embed-spill-", dir=directory)
        self._writers: dict[int, pa.RecordBatchStreamWriter] = {}
        self._files: dict[int, object] = {}

    def add(self, uris: list[str], ids: list[str]) -> None:
        if not uris:
            return
        table = pa.table({schema.URI: uris, schema.ID: ids}, schema=_SPILL_SCHEMA)
        shards = shards_of(ids, self.num_shards)
        for shard in np.unique(shards):
            part = table.filter(pa.array(shards == shard))
            self._writer(int(shard)).write_table(part)

    def _writer(self, shard: int) -> pa.RecordBatchStreamWriter:
        if shard not in self._writers:
            f = open(os.path.join(self.dir, f"{shard:05d}.arrows"), "wb")  # noqa: SIM115
            self._files[shard] = f
            self._writers[shard] = pa.ipc.new_stream(f, _SPILL_SCHEMA)
        return self._writers[shard]

    def finish(self) -> None:
        for writer in self._writers.values():
            writer.close()
        for f in self._files.values():
            f.close()

    def shards(self) -> list[int]:
        return sorted(self._writers)

    def read(self, shard: int) -> pa.Table:
        with pa.memory_map(os.path.join(self.dir, f"{shard:05d}.arrows")) as source:
            return pa.ipc.open_stream(source).read_all()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class PendingInputs:
    """Staged inputs still to embed: ``files`` are (shard, store path, rows, row groups)."""

    staging: str  # the run's staging directory in the store
    block_rows: int
    files: list[tuple[int, str, int, int]] = field(default_factory=list)

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


def stored_ids(store: Store, shard: int) -> pa.Array:
    """The ``id`` column of every part and base part of ``shard`` (repeats included)."""
    parts = [*store.list_parts(shard), *store.list_base_parts(shard)]
    if not parts:
        return pa.array([], pa.string())
    column = store.read_parquet([store.path(p) for p in parts], columns=[schema.ID])[schema.ID]
    return column.combine_chunks()


def deleted_ids(store: Store, shard: int, state: ShardState) -> pa.Array:
    """Ids deleted in ``shard``: its tombstone parts and the deletes its live version applied
    (kept in the version's ``tombstones.parquet`` after the parts are retired). A deleted image
    is not new: re-running the job on its bucket does not bring it back."""
    paths = [store.path(p) for p in store.list_tombstone_parts(shard)]
    if state.dir is not None:
        version_file = posixpath.join(store.index_version_dir(shard, state.dir), TOMBSTONES_FILE)
        if store.exists(version_file):
            paths.append(version_file)
    if not paths:
        return pa.array([], pa.string())
    return store.read_parquet(paths, columns=[schema.ID])[schema.ID].combine_chunks()


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
) -> PendingInputs:
    """Per shard: inputs minus repeats, failed inputs and stored ids -> staging files."""
    pending = PendingInputs(staging=new_staging(store), block_rows=block_rows)
    manifest = load_manifest(store)
    states = manifest.shards if manifest is not None else {}
    for shard in spill.shards():
        table = spill.read(shard)
        if failed is not None and len(failed):
            bad = pc.is_in(table[schema.URI], value_set=failed)
            counts.skipped_failed += pc.sum(bad).as_py() or 0
            table = table.filter(pc.invert(bad))
        present = stored_ids(store, shard)
        counts.store_duplicates += len(present) - len(pc.unique(present))
        present = pa.concat_arrays(
            [present, deleted_ids(store, shard, states.get(shard, ShardState()))]
        )
        if len(present):
            there = pc.is_in(table[schema.ID], value_set=present)
            counts.skipped_present += pc.sum(there).as_py() or 0
            table = table.filter(pc.invert(there))
        unique = unique_by_id(table)  # after: an input already stored counts as present
        counts.duplicates += table.num_rows - unique.num_rows
        table = unique
        if limit is not None:
            room = max(0, limit - counts.pending)
            counts.deferred += max(0, table.num_rows - room)
            table = table.slice(0, room)
        if table.num_rows == 0:
            continue
        counts.pending += table.num_rows
        path = posixpath.join(pending.staging, f"shard={shard:05d}.parquet")
        store.write_parquet(table, path, row_group_size=block_rows)
        groups = -(-table.num_rows // block_rows)
        pending.files.append((shard, path, table.num_rows, groups))
    return pending


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
