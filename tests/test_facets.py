"""What each metadata column holds (``index.query.facets``): the counts the page's filter
controls show, over the visible rows only, merged across shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from index.query.facets import column_facets, merge_facets
from index.rows.columns import Columns


def columns(rows: list[dict]) -> Columns:
    return Columns.from_arrow(pa.Table.from_pylist(rows))


ROWS = [
    {"id": "a", "category": "cat", "price": 3.0, "stock": 1, "sale": True},
    {"id": "b", "category": "dog", "price": float("nan"), "stock": 5, "sale": False},
    {"id": "c", "category": "cat", "price": 9.5, "stock": None, "sale": None},
    {"id": "d", "category": None, "price": 1.0, "stock": 7, "sale": True},
]


def test_counts_ranges_and_nulls_over_visible_rows():
    facets = column_facets(columns(ROWS), np.array([True, True, True, False]))
    assert "id" not in facets  # core columns are not metadata
    assert facets["category"] == {
        "kind": "string",
        "values": {"cat": 2, "dog": 1},
        "other_values": 0,
        "other_rows": 0,
        "nulls": 0,
    }
    # NaN reads as null (no range selects it); the hidden row's 1.0 is not the minimum
    assert facets["price"] == {"kind": "float", "min": 3.0, "max": 9.5, "rows": 2, "nulls": 1}
    assert facets["stock"] == {"kind": "int", "min": 1, "max": 5, "rows": 2, "nulls": 1}
    assert facets["sale"] == {"kind": "bool", "values": {"true": 1, "false": 1}, "nulls": 1}


def test_merge_adds_counts_widens_ranges_and_bounds_the_values_named():
    one = column_facets(columns(ROWS[:2]), np.ones(2, bool))
    two = column_facets(columns(ROWS[2:]), np.ones(2, bool))
    merged = merge_facets([one, two])
    assert merged["category"]["values"] == {"cat": 2, "dog": 1}
    assert merged["category"]["nulls"] == 1
    price = merged["price"]
    assert (price["min"], price["max"], price["rows"]) == (1.0, 9.5, 3)
    assert merged["sale"]["values"] == {"true": 2, "false": 1}

    many = columns([{"tag": f"t{i % 7}"} for i in range(70)] + [{"tag": "rare"}])
    top = merge_facets([column_facets(many, np.ones(71, bool))], top=3)["tag"]
    assert top["values"] == {"t0": 10, "t1": 10, "t2": 10}  # most frequent, ties by value
    assert (top["other_values"], top["other_rows"]) == (5, 41)
    assert merge_facets([]) == {}


def test_a_column_the_rows_lack_counts_them_as_nulls():
    old = column_facets(columns([{"x": 1}] * 3), np.ones(3, bool), kinds={"category": "string"})
    assert old["category"]["nulls"] == 3 and old["category"]["values"] == {}
    new = column_facets(columns([{"category": "cat"}]), np.ones(1, bool), kinds={"x": "int"})
    merged = merge_facets([old, new])
    assert merged["category"]["values"] == {"cat": 1} and merged["category"]["nulls"] == 3
    assert merged["x"] == {"kind": "int", "min": 1, "max": 1, "rows": 3, "nulls": 1}
