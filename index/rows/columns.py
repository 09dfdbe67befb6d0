"""A shard's metadata in memory, columnar and compact: what filters run on and results carry.

Each column is one numpy array of values plus one of validity (null = not valid):

- ``int`` -> int64, ``float`` -> float64 (NaN and infinities, which JSON cannot carry and no
  range can select, read as null), ``bool`` -> bool;
- ``string`` -> int32 codes into a dictionary of the distinct values (-1 for null), so an
  equality or ``in`` test over a shard is one integer comparison per row, and a column of few
  distinct values (categories, brands) costs 4 bytes a row plus its distinct strings.

``Columns`` is the immutable form a loaded version holds (``ShardIndex``), built once from
``rows.parquet``; its dictionaries are Arrow string arrays, looked up with one hash join.
``GrowingColumns`` is the delta's (``index.live.delta``): rows are appended by parts, arrays grow by
doubling and a snapshot is a set of views of the first ``n`` rows, so a search never sees a
half-appended part and never waits for a writer (the same discipline as the delta's vectors).

Bytes per row: 9 (int, float), 2 (bool), 5 plus the distinct strings (string). ``nbytes`` counts
them; ``ShardIndex.memory_bytes`` includes it, since every replica holds it next to the codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index.rows.metadata import TYPES, fits, metadata_columns, type_of_arrow

_NUMPY = {"int": np.int64, "float": np.float64, "bool": np.bool_, "string": np.int32}


class ArrowStrings:
    """An immutable string dictionary (code -> value) backed by one Arrow array."""

    def __init__(self, values: pa.Array):
        self.values = values

    def lookup(self, strings: Sequence[str]) -> np.ndarray:
        """Codes of ``strings`` (-1 for a string not in the dictionary)."""
        if not len(self.values):
            return np.full(len(strings), -1, np.int64)
        found = pc.index_in(pa.array(list(strings), pa.string()), value_set=self.values)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)

    def decode(self, codes: Sequence[int]) -> list[str]:
        return self.values.take(pa.array(codes, pa.int64())).to_pylist()

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


class GrowingStrings:
    """An append-only string dictionary: a value keeps its code forever, so a snapshot taken
    before a value was added simply has no row with its code."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.values: list[str] = []
        self.nbytes = 0

    def add(self, strings: Iterable[str | None]) -> np.ndarray:
        out = []
        for s in strings:
            if s is None:
                out.append(-1)
                continue
            code = self.codes.get(s)
            if code is None:
                code = len(self.values)
                self.values.append(s)  # the list first: a reader that sees the code finds it
                self.codes[s] = code
                self.nbytes += len(s) + 64
            out.append(code)
        return np.asarray(out, np.int32)

    def lookup(self, strings: Sequence[str]) -> np.ndarray:
        return np.asarray([self.codes.get(s, -1) for s in strings], np.int64)

    def decode(self, codes: Sequence[int]) -> list[str]:
        return [self.values[c] for c in codes]


@dataclass(frozen=True)
class Column:
    """One metadata column: ``values`` (codes for strings) and ``valid``, one entry per row."""

    kind: str
    values: np.ndarray
    valid: np.ndarray
    strings: ArrowStrings | GrowingStrings | None = None

    def take(self, rows: np.ndarray) -> list:
        """Python values of ``rows`` (None where null)."""
        rows = np.asarray(rows, np.int64)
        valid = self.valid[rows]
        values = self.values[rows]
        if self.kind == "string":
            decoded = iter(self.strings.decode(values[valid].tolist()))
            return [next(decoded) if ok else None for ok in valid.tolist()]
        return [v if ok else None for v, ok in zip(values.tolist(), valid.tolist(), strict=True)]


class Columns:
    """The metadata columns of ``n`` rows (immutable); absent names read as all-null."""

    def __init__(self, n: int, columns: dict[str, Column] | None = None):
        self.n = n
        self.columns = columns or {}

    @classmethod
    def from_arrow(cls, table: pa.Table) -> Columns:
        """The metadata columns of a rows table (core columns and unknown types skipped)."""
        columns = {}
        for name in metadata_columns(table.column_names):
            kind = type_of_arrow(name, table.schema.field(name).type)
            if kind is not None:
                columns[name] = _from_arrow(kind, table[name])
        return cls(table.num_rows, columns)

    @property
    def schema(self) -> dict[str, str]:
        return {name: c.kind for name, c in self.columns.items()}

    def get(self, name: str) -> Column | None:
        return self.columns.get(name)

    def records(self, rows: np.ndarray, fields: Sequence[str]) -> list[dict]:
        """``{field: value}`` of each row in ``rows``, for the ``fields`` asked (an unknown or
        absent column gives None)."""
        rows = np.asarray(rows, np.int64)
        per_field = {}
        for name in fields:
            column = self.columns.get(name)
            per_field[name] = column.take(rows) if column is not None else [None] * len(rows)
        return [{name: per_field[name][i] for name in fields} for i in range(len(rows))]

    @property
    def nbytes(self) -> int:
        total = 0
        for c in self.columns.values():
            total += c.values.nbytes + c.valid.nbytes
            if isinstance(c.strings, ArrowStrings):
                total += c.strings.nbytes
        return total


def rows_table(columns: Columns, start: int, stop: int) -> pa.Table | None:
    """Rows ``start:stop`` of ``columns`` as an Arrow table, None without columns: what
    ``LiveShard.carry_into`` hands a new view, from a snapshot taken under the delta's lock."""
    if not columns.columns:
        return None
    rows = np.arange(start, stop)
    return pa.table(
        {name: pa.array(c.take(rows), TYPES[c.kind]) for name, c in columns.columns.items()}
    )


def _as_kind(kind: str, column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One array of the column's values in the Arrow type of ``kind`` (chunks joined,
    dictionary-encoded strings decoded)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column.cast(TYPES[kind])


def _from_arrow(kind: str, column: pa.ChunkedArray | pa.Array) -> Column:
    column = _as_kind(kind, column)
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
    if kind == "string":
        encoded = pc.dictionary_encode(column)
        codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        return Column(kind, codes.astype(np.int32), valid, ArrowStrings(encoded.dictionary))
    filled = column.fill_null(False if kind == "bool" else 0)
    values = np.asarray(filled.to_numpy(zero_copy_only=False), _NUMPY[kind])
    if kind == "float":
        valid &= np.isfinite(values)  # NaN (a CSV's "nan") and infinities read as null
    return Column(kind, values, valid)


def _empty(kind: str, rows: int) -> np.ndarray:
    """Values of ``rows`` null rows: string codes are -1 (no string), so an equality test on
    codes alone never matches a null row."""
    return np.full(rows, -1 if kind == "string" else 0, _NUMPY[kind])


class GrowingColumns:
    """Metadata of the delta's rows, appended a part at a time (callers hold the delta's lock).

    ``append`` takes a part's metadata table: a column new to the delta is null for the rows
    before it; a column the part lacks is null for its rows. ``snapshot(n)`` is a ``Columns``
    of views of the first ``n`` rows: later appends never change what it sees.
    """

    def __init__(self) -> None:
        self.n = 0
        self._capacity = 0
        self._kinds: dict[str, str] = {}
        self._values: dict[str, np.ndarray] = {}
        self._valid: dict[str, np.ndarray] = {}
        self._strings: dict[str, GrowingStrings] = {}

    def append(self, table: pa.Table | None, rows: int) -> None:
        start = self.n
        self._reserve(start + rows)
        if table is not None:
            for name in metadata_columns(table.column_names):
                kind = type_of_arrow(name, table.schema.field(name).type)
                if kind is None:
                    continue
                if name not in self._kinds:
                    self._add_column(name, kind)
                elif not fits(self._kinds[name], kind):
                    continue  # refused by every writer's schema check; never mixed here
                self._write(name, start, table[name])
        self.n = start + rows

    def _add_column(self, name: str, kind: str) -> None:
        self._kinds[name] = kind
        self._values[name] = _empty(kind, self._capacity)
        self._valid[name] = np.zeros(self._capacity, bool)
        if kind == "string":
            self._strings[name] = GrowingStrings()

    def _write(self, name: str, start: int, column: pa.ChunkedArray | pa.Array) -> None:
        kind = self._kinds[name]
        column = _as_kind(kind, column)
        stop = start + len(column)
        self._valid[name][start:stop] = column.is_valid().to_numpy(zero_copy_only=False)
        if kind == "string":
            self._values[name][start:stop] = self._strings[name].add(column.to_pylist())
        else:
            filled = column.fill_null(False if kind == "bool" else 0)
            values = filled.to_numpy(zero_copy_only=False)
            self._values[name][start:stop] = values
            if kind == "float":
                self._valid[name][start:stop] &= np.isfinite(values)

    def _reserve(self, rows: int) -> None:
        if rows <= self._capacity:
            return
        capacity = max(256, 2 * self._capacity, rows)
        for name, kind in self._kinds.items():
            values = _empty(kind, capacity)
            values[: self.n] = self._values[name][: self.n]
            valid = np.zeros(capacity, bool)
            valid[: self.n] = self._valid[name][: self.n]
            self._values[name], self._valid[name] = values, valid  # snapshots keep the old ones
        self._capacity = capacity

    def snapshot(self, n: int | None = None) -> Columns:
        n = self.n if n is None else n
        return Columns(
            n,
            {
                name: Column(
                    kind, self._values[name][:n], self._valid[name][:n], self._strings.get(name)
                )
                for name, kind in self._kinds.items()
            },
        )

    def table(self, start: int, stop: int) -> pa.Table | None:
        """Rows ``start:stop`` as an Arrow table (``rows_table`` of a snapshot)."""
        return rows_table(self.snapshot(stop), start, stop)

    @property
    def nbytes(self) -> int:
        total = sum(v.nbytes for v in self._values.values())
        total += sum(v.nbytes for v in self._valid.values())
        return total + sum(s.nbytes for s in self._strings.values())
