"""Rows written as Parquet parts into the shards they belong to, by id hash or by router.

``write_shard_parts`` is the one writer of the jobs' embedding parts (the embedding job's write
stage, ``pipelines.route_store``): one part per shard present, at most ``part_rows`` rows each,
named by a hash of the ids they hold (``part_key``), so a retried task overwrites its own file.

**A routed store** (``index.ann.routing``) places a row by its vector; an image's region rows
(``index.rows.regions``) go with its whole-image row (``route_region_rows``). The embedding
job's write stage sees ``part_rows`` rows at a time, and Ray Data cuts its batches by row count,
so an image's rows may straddle two batches. A batch then cannot place the region rows whose
image row it lacks: ``route_write_batch`` marks them *orphans* and the write stage stages them
in the run's staging folder, with the routed shard of every image row whose rows the batch does
not hold whole (its *tails*); once every batch is written, ``place_orphans`` puts each orphan
in its image's shard (by its own vector when its image never arrived: the image failed).
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from index.rows import schema
from index.rows.regions import parent_of, per_image
from index.storage.store import Store

if TYPE_CHECKING:  # faiss stays out of the embedding job's decode tasks
    from index.ann.routing import Router

ROUTED_STAGING = "routed"  # under a run's staging folder: orphans/ and tails/
_TAILS_SCHEMA = pa.schema([(schema.ID, pa.string()), ("shard", pa.int32())])


def part_key(values: list[str]) -> str:
    """Deterministic part name key: the same set of ids always gives the same file name."""
    joined = "\n".join(sorted(values)).encode("utf-8")
    return hashlib.blake2b(joined, digest_size=12).hexdigest()


def write_shard_parts(
    store: Store, table: pa.Table, shards: np.ndarray, part_rows: int | None = None
) -> int:
    """Write ``table`` (the embeddings schema) as parts of the shards in ``shards`` (one per
    row), at most ``part_rows`` rows a part; returns the number of parts written."""
    shards = np.asarray(shards)
    parts = 0
    for shard in np.unique(shards):
        rows = np.flatnonzero(shards == shard)
        step = part_rows or max(1, len(rows))
        for start in range(0, len(rows), step):
            part = table.take(pa.array(rows[start : start + step], pa.int64()))
            name = store.new_part_name(part_key(part[schema.ID].to_pylist()))
            store.write_parquet(part, posixpath.join(store.embeddings_dir(int(shard)), name))
            parts += 1
    return parts


def route_write_batch(
    ids: list[str], vectors: np.ndarray, router: Router, batch_ids: list[str], regions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard of each of ``ids``, orphan mask, tail mask) for a write batch of a routed store.

    ``ids``/``vectors``: the batch's embedded rows; ``batch_ids``: every row of the batch, failed
    ones too. An orphan is a region row whose image row is not in the batch at all; a tail is an
    image row of ``ids`` with fewer of its rows in the batch than ``per_image(regions)``."""
    from index.ann.routing import route_region_rows

    shards = route_region_rows(ids, router.shards_of(vectors))
    parents = [parent_of(i) for i in ids]
    present = {i for i in batch_ids if parent_of(i) == i}
    orphan = np.fromiter(
        (p != i and p not in present for i, p in zip(ids, parents, strict=True)), bool, len(ids)
    )
    tail = np.zeros(len(ids), bool)
    if regions > 1:
        rows_of: dict[str, int] = {}
        for i in batch_ids:
            rows_of[parent_of(i)] = rows_of.get(parent_of(i), 0) + 1
        whole = per_image(regions)
        tail = np.fromiter(
            (p == i and rows_of[i] < whole for i, p in zip(ids, parents, strict=True)),
            bool,
            len(ids),
        )
    return shards, orphan, tail


def stage_orphans(
    store: Store, staging: str, table: pa.Table, orphan: np.ndarray, tails: pa.Table
) -> None:
    """Stage a batch's orphan rows (``table`` rows where ``orphan``) and its ``tails`` (id,
    shard) under ``staging`` for ``place_orphans``; named by their ids (a retry overwrites)."""
    root = posixpath.join(staging, ROUTED_STAGING)
    if orphan.any():
        rows = table.filter(pa.array(orphan))
        name = store.new_part_name(part_key(rows[schema.ID].to_pylist()))
        store.write_parquet(rows, posixpath.join(root, "orphans", name))
    if tails.num_rows:
        name = store.new_part_name(part_key(tails[schema.ID].to_pylist()))
        store.write_parquet(tails.cast(_TAILS_SCHEMA), posixpath.join(root, "tails", name))


def place_orphans(store: Store, staging: str, router: Router) -> int:
    """Write the run's staged orphan rows into their images' shards; returns the parts written.
    Memory: the tails (a few rows per write batch) and one orphans file at a time."""
    root = posixpath.join(staging, ROUTED_STAGING)
    orphan_files = [posixpath.join(root, "orphans", n) for n in store.ls(f"{root}/orphans")]
    if not orphan_files:
        return 0
    tail_files = [posixpath.join(root, "tails", n) for n in store.ls(f"{root}/tails")]
    shard_of_image: dict[str, int] = {}
    if tail_files:
        tails = store.read_parquet(tail_files)
        ids, shards = tails[schema.ID].to_pylist(), tails["shard"].to_pylist()
        shard_of_image = dict(zip(ids, shards, strict=True))
    parts = 0
    for path in orphan_files:
        table = store.read_parquet([path])
        own = router.shards_of(schema.arrow_to_vectors(table[schema.EMBEDDING]))
        parents = [parent_of(i) for i in table[schema.ID].to_pylist()]
        shards = np.array(
            [shard_of_image.get(p, s) for p, s in zip(parents, own.tolist(), strict=True)],
            np.int32,
        )
        parts += write_shard_parts(store, table, shards)
    return parts
