"""The row visibility rules: the one place that decides which copy of an id is seen, and when.

Rows are never updated in place: a re-added image is a new row with the same id, a delete is a
tombstone ``(id, deleted_at)``. Two rules decide what a search sees, the same in a build
(``read_visible``, vectorised over a whole shard) and in a serving replica (``supersedes`` and
``hides``, one row at a time as parts arrive, ``index.live.delta``):

1. **Newest wins.** Of the rows with one id, the one with the largest ``ingested_at`` is the
   row; on a tie the copy that arrived later wins (a delta row over a base row, a later part over
   an earlier one). An older copy that arrives late never replaces a newer one.
2. **Tombstones hide what they are at least as new as.** A row is hidden when a tombstone for its
   id has ``deleted_at >= ingested_at``; an id deleted and then added again is visible again.

Every build applies the tombstones it read and records their parts in the version's meta
(``tombstone_parts``), so a replica applies only the others, by rule 2 like everything else.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index.rows import schema


def supersedes(new_ingested_ms: int, old_ingested_ms: int) -> bool:
    """Rule 1: does a copy ingested at ``new`` that arrived later replace one at ``old``?"""
    return new_ingested_ms >= old_ingested_ms


def hides(deleted_at_ms: int | None, ingested_ms: int) -> bool:
    """Rule 2: does a tombstone at ``deleted_at_ms`` (None: no tombstone) hide this row?"""
    return deleted_at_ms is not None and deleted_at_ms >= ingested_ms


def ms_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps -> int64 milliseconds (nulls count as 0: older than any delete)."""
    arr = column.cast(schema.TIMESTAMP).cast(pa.int64())
    return np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)


def newest_deletes(tombstones: pa.Table | None) -> pa.Table | None:
    """Tombstone rows reduced to one per id, the newest ``deleted_at`` (None if none)."""
    if tombstones is None or tombstones.num_rows == 0:
        return None
    grouped = tombstones.group_by(schema.ID).aggregate([(schema.DELETED_AT, "max")])
    return grouped.select([schema.ID, f"{schema.DELETED_AT}_max"]).rename_columns(
        [schema.ID, schema.DELETED_AT]
    )


def read_visible(table: pa.Table, tombstones: pa.Table | None) -> tuple[pa.Table, int]:
    """The visible rows of ``table`` (rules 1 and 2), sorted by id; and how many were dropped.

    ``table`` is in the embeddings schema, its chunks in arrival order (later parts last);
    ``tombstones`` in the tombstone schema (any number of rows per id).
    """
    n = table.num_rows
    if n == 0:
        return table, 0
    arrival = pa.array(np.arange(n, dtype=np.int64))
    keys = [(schema.ID, "ascending")]
    if schema.INGESTED_AT in table.column_names:
        keys.append((schema.INGESTED_AT, "descending"))
    keys.append(("__arrival", "descending"))  # a tie goes to the copy that arrived later
    order = pc.sort_indices(table.append_column("__arrival", arrival), sort_keys=keys)
    table = table.take(order)
    ids = table[schema.ID].combine_chunks()
    keep = np.ones(n, dtype=bool)
    if n > 1:
        keep[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    deletes = newest_deletes(tombstones)
    if deletes is not None:
        where = pc.index_in(ids, value_set=deletes[schema.ID].combine_chunks())
        has = np.asarray(pc.is_valid(where).to_numpy(zero_copy_only=False), dtype=bool)
        if has.any():
            rows = np.flatnonzero(has)
            deleted = ms_of(deletes[schema.DELETED_AT].take(where.take(pa.array(rows))))
            if schema.INGESTED_AT in table.column_names:
                ingested = ms_of(table[schema.INGESTED_AT].take(pa.array(rows)))
            else:
                ingested = np.zeros(len(rows), np.int64)
            keep[rows[deleted >= ingested]] = False  # rule 2, vectorised
    dropped = int((~keep).sum())
    if dropped:
        table = table.filter(pa.array(keep))
    return table, dropped
