"""Metadata for the embedding job's rows: a sidecar table joined to the inputs by URI.

A sidecar is a table with a ``uri`` column and any other columns, in CSV (a header row),
Parquet or JSON lines (``.jsonl``/``.ndjson``), local or on any fsspec store; the inputs' own
table file (``pipelines.inputs``: a ``.csv`` of inputs with extra columns) is one too. Its
``uri`` values are resolved like a list file's lines (relative paths against the table's
folder, local paths made absolute), so they equal the input URIs they describe.

Types come from the file: Parquet's own, CSV's and JSON's as pyarrow infers them (for CSV from
the first 64 MB block: a column empty there is read as text). Every other column must be a
string, integer, float or boolean column (``index.rows.metadata``), with a legal name; anything else
stops the job before it writes a row, naming the column. The job merges the columns into the
store's schema (``Manifest.with_metadata``: new columns added, types never changed, ints widen
to float columns) and each staged row gets the store's columns, typed, null where its sidecar
row has none.

Memory stays flat in the catalogue size, as the job's planning does (``pipelines.embed_plan``):
sidecar rows are streamed into one local Arrow file per (shard, table) (``embed_plan.Spill``),
routed by the shard of their URI's id (``index.rows.sharding``: for the default URI ids, the shard
their input is planned in; in a routed store too, whose plan works by the ids' hash shards,
``pipelines.embed_plan``); the planner joins one shard's pending inputs with that shard's rows
(with ``--dedup`` ids, with every shard's rows, one at a time: each bucket of inputs reads the
spill again). Bad rows are skipped and counted, never fatal: a row with no ``uri``
(``skipped``), a URI given again (``duplicates``: the first row wins); inputs without a row
(``missing``) are embedded with null metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index.rows import schema
from index.rows.metadata import MetadataError, conform, merge_schema, schema_of_table
from index.rows.sharding import shards_of, uri_id
from pipelines.embed_plan import Spill
from pipelines.tables import read_table_batches
from pipelines.uris import InputError

_ORDER = "__sidecar_order"


@dataclass
class SidecarCounts:
    rows: int = 0  # sidecar rows read, with a uri
    skipped: int = 0  # rows without a uri
    duplicates: int = 0  # rows repeating a uri (the first one is kept)
    matched: int = 0  # staged inputs that found their row
    missing: int = 0  # staged inputs without a row (null metadata)
    columns: dict[str, str] = field(default_factory=dict)  # the sidecars' columns and types


class Sidecar:
    """Sidecar tables spilled per shard; ``join`` gives staged inputs their metadata."""

    def __init__(self, num_shards: int, directory: str | None = None):
        self.num_shards = num_shards
        self.directory = directory
        self.counts = SidecarCounts()
        self.store_schema: dict[str, str] = {}  # set by the job once merged into the manifest
        self._spills: list[Spill] = []  # one per table (its own column types), keyed by shard
        self._order = 0
        self._cached: tuple[int, pa.Table | None] | None = None  # the last shard's rows
        self._counted: set[int] = set()  # shards whose repeated uris are counted

    def load(self, specs: list[str]) -> Sidecar:
        """Stream every table into the per-shard spill; the columns' schema is merged over the
        tables (a conflict between two tables is an InputError naming the column)."""
        for spec in specs:
            spill = None
            try:
                for table in read_table_batches(spec):
                    table = self._checked(spec, table)
                    if table.num_rows == 0:
                        continue
                    if spill is None:
                        spill = Spill(table.schema, self.directory, "sidecar")
                        self._spills.append(spill)
                    table = table.cast(spill.schema)  # one file's batches share its types
                    ids = [uri_id(u) for u in table[schema.URI].to_pylist()]
                    spill.route(table, shards_of(ids, self.num_shards))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise InputError(f"{spec}: a later block disagrees with the first: {e}") from None
            finally:
                if spill is not None:
                    spill.finish()
        return self

    def _checked(self, spec: str, table: pa.Table) -> pa.Table:
        """Rows with a uri, an order column (first row wins), the columns' types checked."""
        has_uri = pc.is_valid(table[schema.URI])
        kept = table.filter(has_uri)
        self.counts.skipped += table.num_rows - kept.num_rows
        self.counts.rows += kept.num_rows
        try:
            columns = schema_of_table(kept, skip=[schema.URI])
            self.counts.columns = merge_schema(self.counts.columns, columns)
        except MetadataError as e:
            raise InputError(f"{spec}: {e}") from None
        order = pa.array(np.arange(self._order, self._order + kept.num_rows, dtype=np.int64))
        self._order += kept.num_rows
        return kept.append_column(_ORDER, order)

    def _rows(self, shard: int) -> pa.Table | None:
        """The sidecar rows routed to ``shard``, one per uri (first wins), in the store's types;
        the last shard's are kept, since the planner joins a shard's inputs bucket by bucket."""
        if self._cached is None or self._cached[0] != shard:
            self._cached = (shard, self._load(shard))
        return self._cached[1]

    def _load(self, shard: int) -> pa.Table | None:
        tables = []
        for spill in self._spills:
            if shard not in spill.counts:
                continue
            table = spill.read(shard)
            meta = table.drop_columns([schema.URI, _ORDER])
            try:
                typed = conform(_drop_null_columns(meta), self.store_schema)
            except MetadataError as e:
                raise InputError(f"metadata: {e}") from None
            tables.append(
                pa.table({schema.URI: table[schema.URI], _ORDER: table[_ORDER], **_columns(typed)})
            )
        if not tables:
            return None
        rows = pa.concat_tables(tables)
        rows = rows.take(pc.sort_indices(rows, [(schema.URI, "ascending"), (_ORDER, "ascending")]))
        uris = rows[schema.URI].combine_chunks()
        keep = np.ones(rows.num_rows, bool)
        if rows.num_rows > 1:
            keep[1:] = pc.not_equal(uris[1:], uris[:-1]).to_numpy(zero_copy_only=False)
        if shard not in self._counted:
            self._counted.add(shard)
            self.counts.duplicates += int((~keep).sum())
        return rows.filter(pa.array(keep)).drop_columns([_ORDER])

    def join(self, pending: pa.Table, shard: int, every_shard: bool) -> pa.Table:
        """``pending`` (uri, id rows of ``shard``) with the store's metadata columns: from this
        shard's sidecar rows, or (``every_shard``: content ids, not routed by uri) from all."""
        if not self.store_schema:
            return pending
        found = pa.table({schema.URI: pa.array([], pa.string())})
        parts = range(self.num_shards) if every_shard else [shard]
        matches = []
        for part in parts:
            rows = self._rows(part)
            if rows is None:
                continue
            hit = pc.is_in(rows[schema.URI], value_set=pending[schema.URI])
            matches.append(rows.filter(hit))
        if matches:
            found = pa.concat_tables(matches)
        joined = pending.join(found, keys=schema.URI, join_type="left outer") if matches else None
        if joined is None:
            joined = pending
        joined = joined.take(pc.sort_indices(joined, [(schema.ID, "ascending")]))
        self.counts.matched += found.num_rows
        self.counts.missing += pending.num_rows - found.num_rows
        typed = conform(
            _drop_null_columns(joined.drop_columns([schema.URI, schema.ID])), self.store_schema
        )
        return pa.table(
            {schema.URI: joined[schema.URI], schema.ID: joined[schema.ID], **_columns(typed)}
        )

    def close(self) -> None:
        for spill in self._spills:
            spill.close()


def _columns(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    return {name: table[name] for name in table.column_names}


def _drop_null_columns(table: pa.Table) -> pa.Table:
    """All-null columns of unknown type (``null``) are left to ``conform``'s nulls."""
    return table.select([f.name for f in table.schema if not pa.types.is_null(f.type)])
