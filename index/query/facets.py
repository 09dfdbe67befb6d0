"""What each metadata column holds among a shard's visible rows: the page builds its filter
controls from this (a choice list with counts, a numeric range, a toggle).

A facet is computed per shard over the rows a search could return (the base version less its
hidden row keys, plus the live delta rows) and merged across shards by the ingress, so the
counts are what a filter on that value would match at the moment of asking:

- ``string``: ``{"kind": "string", "values": {value: rows}, "other_values": n, "other_rows": m,
  "nulls": z}``: the ``top`` most frequent values (ties by value), and how many distinct values
  and rows were left out (a column of free text stays bounded in size);
- ``int`` / ``float``: ``{"kind", "min", "max", "rows", "nulls"}`` over the non-null rows;
- ``bool``: ``{"kind": "bool", "values": {"true": n, "false": m}, "nulls": z}``.

Pure numpy over ``index.rows.columns``; the cost is one pass over each column's visible rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from index.rows.columns import Columns

TOP_VALUES = 50  # distinct string values named per column; the rest are counted


def column_facets(
    columns: Columns,
    visible: np.ndarray,
    top: int = TOP_VALUES,
    kinds: dict[str, str] | None = None,
) -> dict:
    """The facet of every column of ``columns`` over the rows ``visible`` (bool, one per row);
    a column of ``kinds`` (name -> type) these rows lack (written before it existed) is all
    nulls, so every row without a value counts as one wherever it lives."""
    out: dict[str, dict] = {}
    rows = int(np.count_nonzero(visible))
    for name, kind in (kinds or {}).items():
        if name not in columns.columns:
            out[name] = _all_null(kind, rows)
    for name, column in columns.columns.items():
        valid = column.valid[: len(visible)] & visible[: len(column.valid)]
        seen = int(np.count_nonzero(visible[: len(column.valid)]))
        nulls = seen - int(np.count_nonzero(valid))
        values = column.values[: len(valid)][valid]
        if column.kind == "string":
            codes, counts = np.unique(values, return_counts=True)
            names = column.strings.decode(codes.tolist()) if len(codes) else []
            out[name] = _top(
                {"kind": "string", "values": dict(zip(names, counts.tolist(), strict=True))},
                nulls,
                top,
            )
        elif column.kind == "bool":
            true = int(np.count_nonzero(values))
            out[name] = {
                "kind": "bool",
                "values": {"true": true, "false": int(len(values)) - true},
                "nulls": nulls,
            }
        else:
            finite = values[np.isfinite(values)] if column.kind == "float" else values
            out[name] = {
                "kind": column.kind,
                "min": _number(finite.min()) if len(finite) else None,
                "max": _number(finite.max()) if len(finite) else None,
                "rows": int(len(finite)),
                "nulls": nulls + int(len(values) - len(finite)),
            }
    return out


def _all_null(kind: str, rows: int) -> dict:
    if kind == "string":
        return {"kind": kind, "values": {}, "other_values": 0, "other_rows": 0, "nulls": rows}
    if kind == "bool":
        return {"kind": kind, "values": {"true": 0, "false": 0}, "nulls": rows}
    return {"kind": kind, "min": None, "max": None, "rows": 0, "nulls": rows}


def merge_facets(parts: Iterable[dict], top: int = TOP_VALUES) -> dict:
    """One facet per column from per-shard (or base + delta) facets: counts add, ranges widen."""
    merged: dict[str, dict] = {}
    for facets in parts:
        for name, facet in facets.items():
            into = merged.get(name)
            if into is None:
                merged[name] = _copy(facet)
            elif into["kind"] != facet["kind"]:
                continue  # a column typed differently elsewhere: keep the first (schema wins)
            else:
                _add(into, facet)
    return {
        name: _top(f, f["nulls"], top) if f["kind"] == "string" else f
        for name, f in sorted(merged.items())
    }


def _copy(facet: dict) -> dict:
    out = dict(facet)
    if "values" in facet:
        out["values"] = dict(facet["values"])
    return out


def _add(into: dict, facet: dict) -> None:
    into["nulls"] += facet["nulls"]
    if "values" in facet:
        for value, count in facet["values"].items():
            into["values"][value] = into["values"].get(value, 0) + count
        for key in ("other_values", "other_rows"):
            if key in facet:
                into[key] = into.get(key, 0) + facet[key]
        return
    into["rows"] += facet["rows"]
    for key, pick in (("min", min), ("max", max)):
        if facet[key] is not None:
            into[key] = facet[key] if into[key] is None else pick(into[key], facet[key])


def _top(facet: dict, nulls: int, top: int) -> dict:
    """Keep the ``top`` most frequent values; count what is left out."""
    ranked = sorted(facet["values"].items(), key=lambda kv: (-kv[1], kv[0]))
    kept, rest = ranked[:top], ranked[top:]
    return {
        "kind": "string",
        "values": dict(kept),
        # distinct values dropped here (a value dropped by two shards is counted twice: an
        # upper bound, said as "more values" by the page)
        "other_values": facet.get("other_values", 0) + len(rest),
        "other_rows": facet.get("other_rows", 0) + sum(count for _, count in rest),
        "nulls": nulls,
    }


def _number(value: Any) -> int | float:
    return value.item() if hasattr(value, "item") else value
