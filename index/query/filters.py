"""The metadata filter language: its JSON form, its validation, and its evaluation on a shard.

A filter is a JSON object, one of seven node kinds (after Qdrant's ``must``/``should``/
``must_not`` with ``match``/``range``/``is_null`` conditions, and Milvus's ``==``, ``in``,
``<``..``>=``, ``and``/``or``/``not`` expressions, in a form with no text to parse)::

    {"field": "category", "eq": "shoes"}                equality (string, int, float, bool)
    {"field": "category", "in": ["shoes", "boots"]}     one of 1..1024 values
    {"field": "price", "range": {"gte": 10, "lt": 50}}  numeric bounds: gt, gte, lt, lte (>= 1)
    {"field": "note", "exists": true}                   the value is present (false: null)
    {"and": [filter, ...]}                              all of 1..64 filters
    {"or": [filter, ...]}                               any of 1..64 filters
    {"not": filter}                                     the rows the filter does not match

"in stock, under $50, shoes or boots"::

    {"and": [{"field": "in_stock", "eq": true},
             {"field": "price", "range": {"lt": 50}},
             {"field": "category", "in": ["shoes", "boots"]}]}

Rules: a field must be a column of the store's metadata schema (``index.rows.metadata``); values
must have the column's type (an int column takes integers, a float column any number, ranges
only numeric columns); a null value never matches ``eq``, ``in`` or ``range``, so ``not``
of one of those matches the nulls too (``and`` it with ``exists`` to leave them out). At most
``MAX_NODES`` nodes, ``MAX_DEPTH`` levels deep. Nothing in a filter is ever evaluated as code.

``parse_filter`` checks a JSON value against a schema and returns a ``Filter``: a tree of
frozen dataclasses, small, hashable (a shard caches its mask by it) and picklable, so the
ingress validates once and sends the object itself to the replicas; ``to_json`` gives the
canonical JSON back (``parse_filter(f.to_json(), schema) == f``). ``evaluate`` turns a filter
into a boolean mask over a shard's rows (``index.rows.columns``), one numpy operation per node.
``openapi_schema`` describes the form to OpenAPI, per column when the schema is known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from index.rows.columns import Column, Columns
from index.rows.metadata import A_TYPE, INT64_MAX, INT64_MIN, MAX_STRING_CHARS, is_unicode

MAX_NODES = 256
MAX_DEPTH = 16
MAX_IN_VALUES = 1024
MAX_CHILDREN = 64
RANGE_OPS = ("gt", "gte", "lt", "lte")
CONDITION_OPS = ("eq", "in", "range", "exists")


class FilterError(ValueError):
    """A filter that cannot be run: ``code`` is ``invalid_filter`` (malformed),
    ``unknown_field`` or ``wrong_type``; ``path`` says where (``filter.and[1].range``)."""

    def __init__(self, code: str, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.code = code
        self.path = path


# ---- the tree ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Eq:
    field: str
    value: str | int | float | bool


@dataclass(frozen=True)
class In:
    field: str
    values: tuple


@dataclass(frozen=True)
class Range:
    field: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class Exists:
    field: str
    present: bool = True


@dataclass(frozen=True)
class And:
    items: tuple


@dataclass(frozen=True)
class Or:
    items: tuple


@dataclass(frozen=True)
class Not:
    item: Filter


Filter = Union[Eq, In, Range, Exists, And, Or, Not]  # noqa: UP007 (a runtime alias)


def to_json(node: Filter) -> dict:
    """The canonical JSON form of a filter (what ``parse_filter`` accepts)."""
    if isinstance(node, Eq):
        return {"field": node.field, "eq": node.value}
    if isinstance(node, In):
        return {"field": node.field, "in": list(node.values)}
    if isinstance(node, Range):
        bounds = {op: getattr(node, op) for op in RANGE_OPS if getattr(node, op) is not None}
        return {"field": node.field, "range": bounds}
    if isinstance(node, Exists):
        return {"field": node.field, "exists": node.present}
    if isinstance(node, And):
        return {"and": [to_json(i) for i in node.items]}
    if isinstance(node, Or):
        return {"or": [to_json(i) for i in node.items]}
    if isinstance(node, Not):
        return {"not": to_json(node.item)}
    raise TypeError(f"not a filter node: {node!r}")


def fields_of(node: Filter) -> set[str]:
    if isinstance(node, And | Or):
        return set().union(*(fields_of(i) for i in node.items))
    if isinstance(node, Not):
        return fields_of(node.item)
    return {node.field}


# ---- parsing -----------------------------------------------------------------------------------
def parse_filter(body: Any, schema: Mapping[str, str]) -> Filter:
    """Check a JSON filter against the metadata ``schema`` (name -> type); FilterError names
    the first problem and where it is."""
    counter = [0]
    return _parse(body, schema, "filter", 1, counter)


def _parse(body: Any, schema: Mapping[str, str], path: str, depth: int, counter: list) -> Filter:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise FilterError("invalid_filter", path, f"a filter has at most {MAX_NODES} nodes")
    if depth > MAX_DEPTH:
        raise FilterError("invalid_filter", path, f"a filter nests at most {MAX_DEPTH} levels")
    if not isinstance(body, dict):
        raise FilterError("invalid_filter", path, "must be a JSON object (see the filter form)")
    if "field" in body:
        return _condition(body, schema, path)
    keys = set(body)
    if len(keys) != 1 or not keys <= {"and", "or", "not"}:
        raise FilterError(
            "invalid_filter",
            path,
            f"expected one of 'and', 'or', 'not', or a condition with 'field'; got keys "
            f"{sorted(keys)}",
        )
    (op,) = keys
    value = body[op]
    if op == "not":
        return Not(_parse(value, schema, f"{path}.not", depth + 1, counter))
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CHILDREN:
        raise FilterError(
            "invalid_filter", f"{path}.{op}", f"must be a list of 1..{MAX_CHILDREN} filters"
        )
    items = tuple(
        _parse(v, schema, f"{path}.{op}[{i}]", depth + 1, counter) for i, v in enumerate(value)
    )
    return And(items) if op == "and" else Or(items)


def _condition(body: dict, schema: Mapping[str, str], path: str) -> Filter:
    name = body["field"]
    ops = [k for k in body if k != "field"]
    unknown = [k for k in ops if k not in CONDITION_OPS]
    if unknown or len(ops) != 1:
        raise FilterError(
            "invalid_filter",
            path,
            f"a condition has 'field' and exactly one of {', '.join(CONDITION_OPS)}; got "
            f"{sorted(ops)}",
        )
    if not isinstance(name, str) or not name:
        raise FilterError("invalid_filter", f"{path}.field", "must be a column name (a string)")
    kind = schema.get(name)
    if kind is None:
        known = ", ".join(schema) or "none: this store has no metadata columns"
        raise FilterError(
            "unknown_field", f"{path}.field", f"no metadata column {name!r} ({known})"
        )
    (op,) = ops
    value = body[op]
    where = f"{path}.{op}"
    if op == "eq":
        return Eq(name, _value(name, kind, value, where))
    if op == "in":
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES:
            raise FilterError(
                "invalid_filter", where, f"must be a list of 1..{MAX_IN_VALUES} values"
            )
        values = tuple(_value(name, kind, v, f"{where}[{i}]") for i, v in enumerate(value))
        return In(name, tuple(dict.fromkeys(values)))  # repeats dropped, order kept
    if op == "exists":
        if not isinstance(value, bool):
            raise FilterError("invalid_filter", where, "must be true or false")
        return Exists(name, value)
    if kind not in ("int", "float"):
        raise FilterError(
            "wrong_type", where, f"{name!r} is {A_TYPE[kind]} column; ranges are numeric"
        )
    if not isinstance(value, dict) or not value or set(value) - set(RANGE_OPS):
        ops_text = ", ".join(RANGE_OPS)
        raise FilterError("invalid_filter", where, f"must be an object of 1..4 bounds: {ops_text}")
    bounds = {op: _number(v, f"{where}.{op}") for op, v in value.items()}
    return Range(name, **bounds)


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FilterError("wrong_type", where, f"a bound must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError("wrong_type", where, "a bound must be finite")
    return value


def _value(name: str, kind: str, value: Any, where: str):
    if kind == "string":
        if not isinstance(value, str):
            raise FilterError("wrong_type", where, f"{name!r} is a string column; got {value!r}")
        if len(value) > MAX_STRING_CHARS:
            raise FilterError("invalid_filter", where, f"at most {MAX_STRING_CHARS} characters")
        if not is_unicode(value):
            raise FilterError("invalid_filter", where, "not valid Unicode (a lone surrogate)")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise FilterError("wrong_type", where, f"{name!r} is a bool column; got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FilterError("wrong_type", where, f"{name!r} is {A_TYPE[kind]} column; got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError("wrong_type", where, "values must be finite numbers")
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise FilterError("wrong_type", where, f"{name!r} is an int column; got {value}")
            value = int(value)
        if not INT64_MIN <= value <= INT64_MAX:
            raise FilterError("wrong_type", where, f"{value} does not fit in 64 bits")
        return value
    return float(value)


# ---- evaluation --------------------------------------------------------------------------------
def evaluate(node: Filter, columns: Columns) -> np.ndarray:
    """Boolean mask over the ``columns.n`` rows: True where the row matches ``node``."""
    n = columns.n
    if isinstance(node, And):
        mask = evaluate(node.items[0], columns)
        for item in node.items[1:]:
            mask &= evaluate(item, columns)
        return mask
    if isinstance(node, Or):
        mask = evaluate(node.items[0], columns)
        for item in node.items[1:]:
            mask |= evaluate(item, columns)
        return mask
    if isinstance(node, Not):
        return ~evaluate(node.item, columns)
    column = columns.get(node.field)
    if column is None:  # a column added after these rows were written: all null here
        return np.full(n, isinstance(node, Exists) and not node.present, bool)
    if isinstance(node, Exists):
        return column.valid.copy() if node.present else ~column.valid
    if isinstance(node, Eq):
        return _in(column, (node.value,))
    if isinstance(node, In):
        return _in(column, node.values)
    if isinstance(node, Range):
        return _range(column, node)
    raise TypeError(f"not a filter node: {node!r}")


def _in(column: Column, values: tuple) -> np.ndarray:
    if column.kind == "string":
        codes = column.strings.lookup([v for v in values if isinstance(v, str)])
        codes = codes[codes >= 0]
        if len(codes) == 0:
            return np.zeros(len(column.values), bool)
        if len(codes) == 1:
            return column.values == codes[0]
        return np.isin(column.values, codes)
    if column.kind == "bool":
        wanted = {bool(v) for v in values if isinstance(v, bool)}
        if wanted == {True, False}:
            return column.valid.copy()
        if not wanted:
            return np.zeros(len(column.values), bool)
        return column.valid & (column.values == wanted.pop())
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numbers) == 1:
        return column.valid & (column.values == numbers[0])
    return column.valid & np.isin(column.values, np.asarray(numbers, column.values.dtype))


def _range(column: Column, node: Range) -> np.ndarray:
    if column.kind not in ("int", "float"):
        return np.zeros(len(column.values), bool)
    mask = column.valid.copy()
    values = column.values
    if node.gt is not None:
        mask &= values > node.gt
    if node.gte is not None:
        mask &= values >= node.gte
    if node.lt is not None:
        mask &= values < node.lt
    if node.lte is not None:
        mask &= values <= node.lte
    return mask


# ---- OpenAPI -----------------------------------------------------------------------------------
_VALUE_SCHEMA = {
    "string": {"type": "string", "maxLength": MAX_STRING_CHARS},
    "int": {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
}
ANY_VALUE = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
RANGE_SCHEMA = {
    "type": "object",
    "properties": {op: {"type": "number"} for op in RANGE_OPS},
    "minProperties": 1,
    "additionalProperties": False,
}


def openapi_schema(schema: Mapping[str, str] | None, ref: str) -> dict:
    """JSON Schema of the filter form. With the store's metadata ``schema`` each condition is
    spelled out per column (its name as a constant, values of its type), so a client generated
    from it sends only filters this store accepts; ``ref`` is where this schema itself lives
    (``#/components/schemas/Filter``), for the nested ``and``/``or``/``not``."""
    nested = {"$ref": ref}
    logical = [
        _object("and", {"type": "array", "items": nested, "minItems": 1, "maxItems": 8}),
        _object("or", {"type": "array", "items": nested, "minItems": 1, "maxItems": 8}),
        _object("not", nested),
    ]
    if schema is None:
        field = {"type": "string", "description": "a metadata column of the store"}
        conditions = [
            _condition_schema(field, "eq", ANY_VALUE),
            _condition_schema(field, "in", {"type": "array", "items": ANY_VALUE, "minItems": 1}),
            _condition_schema(field, "range", RANGE_SCHEMA),
            _condition_schema(field, "exists", {"type": "boolean"}),
        ]
    else:
        conditions = []
        for name, kind in schema.items():
            field = {"type": "string", "const": name}
            value = _VALUE_SCHEMA[kind]
            values = {"type": "array", "items": value, "minItems": 1, "maxItems": MAX_IN_VALUES}
            conditions += [
                _condition_schema(field, "eq", value),
                _condition_schema(field, "in", values),
                _condition_schema(field, "exists", {"type": "boolean"}),
            ]
            if kind in ("int", "float"):
                conditions.append(_condition_schema(field, "range", RANGE_SCHEMA))
    return {
        "description": (
            "A metadata filter: a condition on one column (eq, in, range, exists) or and/or/"
            "not of filters; see the API description for the rules."
        ),
        "oneOf": [*conditions, *logical],
    }


def _object(key: str, value: dict) -> dict:
    return {
        "type": "object",
        "properties": {key: value},
        "required": [key],
        "additionalProperties": False,
    }


def _condition_schema(field: dict, op: str, value: dict) -> dict:
    return {
        "type": "object",
        "properties": {"field": field, op: value},
        "required": ["field", op],
        "additionalProperties": False,
    }
