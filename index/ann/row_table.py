"""The rows of one loaded version, by row key: ids, URIs, ``ingested_at`` and metadata columns.

A version's ``rows.parquet`` maps row keys 0..n-1 (what FAISS returns) to what a hit reports.
Row ids are kept as one Arrow string array (offsets + bytes: the size of the ids themselves, so
one long id costs only its own bytes) with each row's ``ingested_at`` (for the visibility rules,
``index.rows.visibility``), and looked up by binary search over the rows, which builds
(``index.live.rebuild``) store sorted by id; a version whose ids are not in order keeps a sort
order beside them. Metadata columns are held in the compact columnar form of
``index.rows.columns``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index.rows import schema
from index.rows.columns import Columns
from index.rows.metadata import MetadataError, metadata_columns
from index.rows.visibility import ms_of
from index.storage.versions import KEY, IndexLoadError

FEW_KEYS = 8  # at most this many rows are read one by one (``RowTable.ids_uris``)


@dataclass
class RowTable:
    ids: pa.Array  # string array by row key; sorted when built by index.live.rebuild
    uris: pa.Array
    ingested: np.ndarray  # int64 ms by row key (0 when unknown)
    order: np.ndarray | None = None  # row keys in id order, when the ids are not sorted
    meta: Columns | None = None  # metadata columns by row key (index.rows.columns)

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.order is None else self.order.nbytes
        extra += 0 if self.meta is None else self.meta.nbytes
        return self.ids.nbytes + self.uris.nbytes + self.ingested.nbytes + extra

    def columns(self) -> Columns:
        """The metadata columns (none held: every column reads as null)."""
        return self.meta or Columns(self.count)

    def ids_uris(self, keys: np.ndarray) -> tuple[list[str], list[str]]:
        """The ids and URIs of row ``keys`` (all valid). A few are read one by one: an Arrow
        ``take`` costs ~10 us however few rows it takes, a scalar read ~1.5 us, and a group's
        answer reads a handful of rows from each of many shards."""
        if len(keys) <= FEW_KEYS:
            ids, uris = self.ids, self.uris
            return [ids[int(k)].as_py() for k in keys], [uris[int(k)].as_py() for k in keys]
        taken = pa.array(np.asarray(keys, np.int64))
        return self.ids.take(taken).to_pylist(), self.uris.take(taken).to_pylist()

    def key_of(self, row_id: str) -> int | None:
        """Row key of an id, or None (binary search over the rows in id order)."""
        ids, order, count = self.ids, self.order, self.count
        lo, hi = 0, count
        while lo < hi:
            mid = (lo + hi) // 2
            key = mid if order is None else int(order[mid])
            if ids[key].as_py() < row_id:
                lo = mid + 1
            else:
                hi = mid
        if lo < count:
            key = lo if order is None else int(order[lo])
            if ids[key].as_py() == row_id:
                return key
        return None

    def keys_of(self, row_ids: list[str]) -> np.ndarray:
        """Row keys of many ids at once (-1 where absent): one hash join, for bulk lookups."""
        if not row_ids or self.count == 0:
            return np.full(len(row_ids), -1, np.int64)
        found = pc.index_in(pa.array(row_ids, pa.string()), value_set=self.ids)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)


def read_row_table(path: Path, count: int) -> RowTable:
    """A version's ``rows.parquet``; ``IndexLoadError`` unless it holds keys 0..count-1 in order."""
    try:
        names = pq.read_schema(path).names
        columns = [KEY, schema.ID, schema.URI]
        if schema.INGESTED_AT in names:
            columns.append(schema.INGESTED_AT)
        columns += metadata_columns(names)
        table = pq.read_table(path, columns=columns)
        meta = Columns.from_arrow(table)
    except (OSError, pa.ArrowException, MetadataError) as e:
        raise IndexLoadError(f"{path}: {e}") from e
    if table.num_rows != count:
        raise IndexLoadError(f"{path}: {table.num_rows} rows, meta says {count}")
    keys = table[KEY].to_numpy()
    if count and not np.array_equal(keys, np.arange(count)):
        raise IndexLoadError(f"{path}: row keys are not 0..n-1 in order")
    ids = table[schema.ID].combine_chunks()
    if schema.INGESTED_AT in table.column_names:
        ingested = ms_of(table[schema.INGESTED_AT])
    else:
        ingested = np.zeros(count, np.int64)
    order = None
    if count > 1 and not pc.all(pc.less(ids[:-1], ids[1:])).as_py():
        order = pc.sort_indices(ids).to_numpy()  # built from arrays not in id order
    return RowTable(
        ids=ids, uris=table[schema.URI].combine_chunks(), ingested=ingested, order=order, meta=meta
    )
