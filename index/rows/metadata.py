"""Metadata columns: their types, the names they may take, and how a store's schema evolves.

A row carries typed metadata next to its core columns (``index.rows.schema``): a catalogue's price,
category, stock flag. Four types exist, each with one Arrow type in Parquet and in memory:

=========  ===========  =================================================================
type       Arrow        JSON values
=========  ===========  =================================================================
string     string       strings (at most ``MAX_STRING_CHARS`` characters when written)
int        int64        integers (a number with no fraction, e.g. ``3.0``, counts as one)
float      float64      numbers (finite)
bool       bool         ``true`` / ``false``
=========  ===========  =================================================================

Every value may be null (absent). The store's manifest records the schema (name -> type, in
column order); every writer is checked against it (``merge_schema``), by this rule:

- a **new** column is added to the schema (rows written before it read as null);
- a column **missing** from a writer's rows is null in those rows;
- a column's type never changes: a writer whose column has another type is refused, except
  int values for a float column, which are widened (an input file that happened to hold whole
  prices only is still a price column);
- at most ``MAX_COLUMNS`` columns; names are identifiers (``NAME_RE``) other than the core
  columns and the words the API uses around results (``RESERVED``).

No FAISS and no Ray here: the batch job, the serving ingress and the index layer all use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from index.rows import schema as core

TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
}
A_TYPE = {"string": "a string", "int": "an int", "float": "a float", "bool": "a bool"}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_COLUMNS = 64
MAX_STRING_CHARS = 4096
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# core columns of the Parquet parts and rows.parquet, the names of a result's own keys, the
# JSON-text column ``POST /images`` wrote before metadata was typed, the request fields of a
# multipart form, and the embedding job's working columns (``pipelines.embed_stages``)
RESERVED = frozenset(
    {
        *core.CORE_COLUMNS,
        core.ERROR,
        core.STAGE,
        core.DELETED_AT,
        "key",
        "metadata",
        "score",
        "shard",
        "in",
        "ingested_at_ms",
        "file",
        "vector",
        "filter",
        "fields",
        "crop",
        "embedded_at",
        "model_seconds",
    }
)


class MetadataError(ValueError):
    """A metadata column or value that cannot be stored; the message names it."""


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise MetadataError(
            f"metadata column name {name!r} is not an identifier (letters, digits, _; "
            "at most 64 characters, not starting with a digit)"
        )
    if name in RESERVED:
        raise MetadataError(f"metadata column name {name!r} is reserved")
    return name


def type_of_arrow(name: str, dtype: pa.DataType) -> str | None:
    """The metadata type of an Arrow column type (None: all-null, type unknown yet)."""
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_null(dtype):
        return None
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_floating(dtype):
        return "float"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    raise MetadataError(
        f"metadata column {name!r} has type {dtype}; metadata columns are string, int, float "
        "or bool (cast it, e.g. dates to ISO strings, in the input table)"
    )


def schema_of_table(table: pa.Table, skip: Iterable[str] = ()) -> dict[str, str]:
    """``{name: type}`` of a table's columns except ``skip`` (names checked; all-null columns,
    whose type cannot be told, are left out)."""
    skipped = set(skip)
    out: dict[str, str] = {}
    for field in table.schema:
        if field.name in skipped:
            continue
        kind = type_of_arrow(check_name(field.name), field.type)
        if kind is not None:
            out[field.name] = kind
    return out


def fits(stored: str, kind: str) -> bool:
    """Values of type ``kind`` go into a column of type ``stored``: the same type, or whole
    numbers into a float column (a later input's whole prices); no other change of type."""
    return kind == stored or (stored == "float" and kind == "int")


def _check_column(name: str, kind: str) -> None:
    check_name(name)
    if kind not in TYPES:
        raise MetadataError(f"metadata column {name!r}: unknown type {kind!r}")


def check_schema(schema: Mapping[str, str]) -> dict[str, str]:
    """A schema as stored: names checked, types known, at most ``MAX_COLUMNS``."""
    out = {}
    for name, kind in schema.items():
        _check_column(name, kind)
        out[name] = kind
    if len(out) > MAX_COLUMNS:
        raise MetadataError(f"{len(out)} metadata columns; at most {MAX_COLUMNS}")
    return out


def merge_schema(stored: Mapping[str, str], incoming: Mapping[str, str]) -> dict[str, str]:
    """The store's schema after a writer with ``incoming`` columns (the rule in the docstring):
    stored columns first, new ones after in the writer's order; a type conflict raises."""
    merged = dict(stored)
    for name, kind in incoming.items():
        _check_column(name, kind)
        old = merged.get(name)
        if old is None:
            merged[name] = kind
        elif not fits(old, kind):
            raise MetadataError(
                f"metadata column {name!r} is {old} in this store but {kind} in the new rows; "
                "a column's type never changes (write it under a new name, or use a new store)"
            )
    if len(merged) > MAX_COLUMNS:
        raise MetadataError(f"{len(merged)} metadata columns; a store holds at most {MAX_COLUMNS}")
    return merged


def conform(table: pa.Table, schema: Mapping[str, str]) -> pa.Table:
    """Metadata columns of ``table`` in the schema's Arrow types and order; columns the schema
    has and the table lacks are null. A column the schema lacks, or a value that does not fit
    (a fraction in an int column), raises MetadataError."""
    extra = [c for c in table.column_names if c not in schema]
    if extra:
        raise MetadataError(f"metadata columns {extra} are not in the store's schema")
    columns = {}
    for name, kind in schema.items():
        target = TYPES[kind]
        if name not in table.column_names:
            columns[name] = pa.nulls(table.num_rows, target)
            continue
        column = table[name]
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        found = type_of_arrow(name, column.type)
        if found is not None and not fits(kind, found):
            raise MetadataError(
                f"metadata column {name!r} holds {column.type} values; the store's schema "
                f"says {kind}"
            )
        try:
            columns[name] = column.cast(target)  # safe casts only: overflow raises
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise MetadataError(f"metadata column {name!r}: {e}") from None
    return pa.table(columns, schema=arrow_schema(schema)) if schema else pa.table({})


def arrow_schema(schema: Mapping[str, str]) -> pa.Schema:
    return pa.schema([pa.field(name, TYPES[kind]) for name, kind in schema.items()])


def check_value(name: str, kind: str, value: Any) -> Any:
    """One JSON value for a column of type ``kind``, as stored (None stays None)."""
    if value is None:
        return None
    if kind == "string":
        if not isinstance(value, str):
            raise MetadataError(f"{name!r} is a string column; got {_describe(value)}")
        if len(value) > MAX_STRING_CHARS:
            raise MetadataError(f"{name!r}: strings are at most {MAX_STRING_CHARS} characters")
        if not is_unicode(value):
            raise MetadataError(f"{name!r}: the string is not valid Unicode (a lone surrogate)")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise MetadataError(f"{name!r} is a bool column; got {_describe(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetadataError(f"{name!r} is {A_TYPE[kind]} column; got {_describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise MetadataError(f"{name!r}: {value} is not a finite number")
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise MetadataError(f"{name!r} is an int column; got the fraction {value}")
            value = int(value)
        if not INT64_MIN <= value <= INT64_MAX:
            raise MetadataError(f"{name!r}: {value} does not fit in 64 bits")
        return value
    return float(value)


def check_record(values: Mapping[str, Any], schema: Mapping[str, str]) -> dict[str, Any]:
    """A JSON object of metadata checked against the schema (unknown names raise)."""
    unknown = sorted(set(values) - set(schema))
    if unknown:
        known = ", ".join(schema) or "none: this store has no metadata columns"
        raise MetadataError(f"unknown metadata fields {unknown}; the store's columns: {known}")
    return {name: check_value(name, schema[name], v) for name, v in values.items()}


def record_columns(records: list[Mapping[str, Any]], schema: Mapping[str, str]) -> pa.Table:
    """Checked records (``check_record``) as a table in the schema (missing values null)."""
    return pa.table(
        {
            name: pa.array([r.get(name) for r in records], TYPES[kind])
            for name, kind in schema.items()
        },
        schema=arrow_schema(schema),
    )


def metadata_columns(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that can be metadata columns (parts and rows.parquet hold the
    core columns and possibly the old JSON-text ``metadata`` column too)."""
    return [n for n in names if n not in RESERVED and NAME_RE.match(n)]


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be stored (UTF-8): JSON can carry lone surrogates, Arrow cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe(value: Any) -> str:
    kind = {bool: "a bool", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), f"a {type(value).__name__}"
    )
    text = repr(value)
    return f"{kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


__all__ = [
    "MAX_COLUMNS",
    "MetadataError",
    "TYPES",
    "arrow_schema",
    "check_name",
    "check_record",
    "check_schema",
    "check_value",
    "conform",
    "merge_schema",
    "metadata_columns",
    "record_columns",
    "schema_of_table",
    "type_of_arrow",
]
