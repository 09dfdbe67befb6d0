"""Metadata and filtered search in the index layer, no Ray: the schema rules, the filter language,
and a real store (IVF+PQ shards, a delta, tombstones) searched with filters at every selectivity
against exact filtered search."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from harness.stores import write_store
from index.ann.exact import exact_search
from index.ann.shard_index import ShardIndex
from index.live.delta import LiveShard, load_live_shard
from index.live.parts import write_rows, write_tombstones
from index.live.rebuild import rebuild_shard
from index.query.filters import (
    And,
    Eq,
    Exists,
    FilterError,
    In,
    Not,
    Or,
    Range,
    evaluate,
    fields_of,
    parse_filter,
    to_json,
)
from index.rows import schema
from index.rows.columns import Columns, GrowingColumns
from index.rows.metadata import (
    MetadataError,
    check_record,
    conform,
    merge_schema,
    schema_of_table,
)
from index.rows.sharding import shard_of, shards_of
from index.storage.manifest import Manifest, ManifestMismatch, evolve_metadata, load_manifest

SCHEMA = {"category": "string", "price": "float", "in_stock": "bool", "qty": "int"}
DIM, N, SHARDS = 32, 6000, 2
CATEGORIES = [f"cat{i:02d}" for i in range(20)]


# ---- the schema rules --------------------------------------------------------------------------
def test_schema_evolves_by_adding_columns_and_never_changes_a_type():
    stored = {"category": "string", "price": "float"}
    assert merge_schema(stored, {"price": "int", "brand": "string"}) == {
        "category": "string",
        "price": "float",  # whole prices in a later input stay a float column
        "brand": "string",
    }
    with pytest.raises(MetadataError, match="'category' is string in this store but int"):
        merge_schema(stored, {"category": "int"})
    with pytest.raises(MetadataError, match="'price' is int in this store but float"):
        merge_schema({"price": "int"}, {"price": "float"})
    for bad in ("id", "uri", "score", "metadata", "1abc", "a-b", ""):
        with pytest.raises(MetadataError):
            merge_schema({}, {bad: "string"})
    with pytest.raises(MetadataError, match="unknown type"):
        merge_schema({}, {"x": "date"})
    table = pa.table({"price": pa.array([1, 2], pa.int32()), "category": ["a", None]})
    assert schema_of_table(table) == {"price": "int", "category": "string"}
    typed = conform(table, {"category": "string", "price": "float", "qty": "int"})
    assert typed.schema.names == ["category", "price", "qty"]
    assert typed["price"].to_pylist() == [1.0, 2.0] and typed["qty"].null_count == 2
    with pytest.raises(MetadataError, match="not in the store's schema"):
        conform(table, {"price": "float"})
    with pytest.raises(MetadataError, match="holds double values"):
        conform(pa.table({"qty": [1.5]}), {"qty": "int"})
    assert check_record({"price": 3, "qty": 4.0, "in_stock": None}, SCHEMA) == {
        "price": 3.0,
        "qty": 4,
        "in_stock": None,
    }
    for bad in ({"price": "3"}, {"qty": 1.5}, {"in_stock": 1}, {"category": 7}, {"nope": 1}):
        with pytest.raises(MetadataError):
            check_record(bad, SCHEMA)


def test_manifest_records_the_schema_and_refuses_a_conflict(tmp_path):
    store = write_store(tmp_path / "s", ["a"], ["u"], np.ones((1, 4), np.float32), 1)
    assert load_manifest(store).metadata == {}
    evolve_metadata(store, {"price": "float"})
    m = evolve_metadata(store, {"price": "int", "brand": "string"})
    assert m.metadata == {"price": "float", "brand": "string"}
    assert load_manifest(store).metadata == {"price": "float", "brand": "string"}
    sequence = load_manifest(store).sequence
    evolve_metadata(store, {"brand": "string"})  # nothing new: no commit
    assert load_manifest(store).sequence == sequence
    with pytest.raises(ManifestMismatch, match="'brand' is string"):
        evolve_metadata(store, {"brand": "bool"})
    # a manifest written before metadata existed reads with an empty schema
    body = Manifest("m", "w", 4, 1).to_json().replace(',"metadata":{}', "")
    assert '"metadata"' not in body and Manifest.from_json(body).metadata == {}


# ---- the filter language -----------------------------------------------------------------------
def test_filters_parse_round_trip_pickle_and_name_their_problems():
    body = {
        "and": [
            {"field": "in_stock", "eq": True},
            {"field": "price", "range": {"gte": 10, "lt": 50}},
            {"or": [{"field": "category", "in": ["cat01", "cat02", "cat01"]}, {"not": {}}]},
        ]
    }
    with pytest.raises(FilterError) as info:
        parse_filter(body, SCHEMA)
    assert info.value.code == "invalid_filter" and info.value.path == "filter.and[2].or[1].not"
    body["and"][2]["or"][1] = {"not": {"field": "qty", "exists": True}}
    flt = parse_filter(body, SCHEMA)
    assert flt == And(
        (
            Eq("in_stock", True),
            Range("price", gte=10, lt=50),
            Or((In("category", ("cat01", "cat02")), Not(Exists("qty", True)))),
        )
    )
    assert parse_filter(to_json(flt), SCHEMA) == flt
    assert pickle.loads(pickle.dumps(flt)) == flt and hash(flt) == hash(parse_filter(body, SCHEMA))
    assert fields_of(flt) == {"in_stock", "price", "category", "qty"}
    assert parse_filter({"field": "qty", "eq": 3.0}, SCHEMA) == Eq("qty", 3)
    cases = [
        ({"field": "colour", "eq": "red"}, "unknown_field", "filter.field"),
        ({"field": "price", "eq": "cheap"}, "wrong_type", "filter.eq"),
        ({"field": "qty", "eq": 1.5}, "wrong_type", "filter.eq"),
        ({"field": "in_stock", "eq": 1}, "wrong_type", "filter.eq"),
        ({"field": "category", "range": {"lt": 3}}, "wrong_type", "filter.range"),
        ({"field": "price", "range": {"lt": "3"}}, "wrong_type", "filter.range.lt"),
        ({"field": "price", "range": {}}, "invalid_filter", "filter.range"),
        ({"field": "price", "range": {"below": 3}}, "invalid_filter", "filter.range"),
        ({"field": "category", "in": []}, "invalid_filter", "filter.in"),
        ({"field": "category", "in": ["a", 2]}, "wrong_type", "filter.in[1]"),
        ({"field": "price", "eq": 1, "lt": 2}, "invalid_filter", "filter"),
        ({"field": "price"}, "invalid_filter", "filter"),
        ({"field": "qty", "exists": "yes"}, "invalid_filter", "filter.exists"),
        ({"and": []}, "invalid_filter", "filter.and"),
        ({"and": [{"field": "qty", "exists": True}], "or": []}, "invalid_filter", "filter"),
        ({"xor": []}, "invalid_filter", "filter"),
        ([{"field": "qty", "exists": True}], "invalid_filter", "filter"),
        ("price < 50", "invalid_filter", "filter"),
    ]
    for body, code, path in cases:
        with pytest.raises(FilterError) as info:
            parse_filter(body, SCHEMA)
        assert (info.value.code, info.value.path) == (code, path), (body, info.value)
    deep: dict = {"field": "qty", "exists": True}
    for _ in range(20):
        deep = {"not": deep}
    with pytest.raises(FilterError, match="nests at most"):
        parse_filter(deep, SCHEMA)
    wide = {"or": [{"or": [{"field": "qty", "exists": True}] * 60}] * 10}
    with pytest.raises(FilterError, match="at most 256 nodes"):
        parse_filter(wide, SCHEMA)


def test_filter_evaluation_nulls_not_and_absent_columns():
    table = pa.table(
        {
            "category": ["a", "b", None, "a", "c"],
            "price": [5.0, 50.0, 20.0, None, 10.0],
            "in_stock": [True, False, True, None, True],
            "qty": [1, 2, 3, 4, None],
        }
    )
    cols = Columns.from_arrow(table)

    def rows(body):
        return np.flatnonzero(evaluate(parse_filter(body, SCHEMA), cols)).tolist()

    assert rows({"field": "category", "eq": "a"}) == [0, 3]
    assert rows({"field": "category", "eq": "zzz"}) == []
    assert rows({"field": "category", "in": ["a", "c", "nope"]}) == [0, 3, 4]
    assert rows({"not": {"field": "category", "eq": "a"}}) == [1, 2, 4]  # nulls included
    assert rows({"field": "price", "range": {"gte": 10, "lte": 20}}) == [2, 4]
    assert rows({"field": "price", "range": {"gt": 5, "lt": 50}}) == [2, 4]
    assert rows({"field": "in_stock", "eq": False}) == [1]
    assert rows({"field": "in_stock", "in": [True, False]}) == [0, 1, 2, 4]
    assert rows({"field": "qty", "in": [2, 4, 9]}) == [1, 3]
    assert rows({"field": "qty", "exists": False}) == [4]
    assert rows({"or": [{"field": "qty", "eq": 1}, {"field": "price", "eq": 10}]}) == [0, 4]
    nan = Columns.from_arrow(pa.table({"price": [1.0, float("nan"), float("inf")]}))
    assert nan.records(np.arange(3), ["price"]) == [
        {"price": 1.0},
        {"price": None},
        {"price": None},
    ]
    assert evaluate(Range("price", gt=0), nan).tolist() == [True, False, False]
    # a column the store gained after these rows were written reads as null here
    absent = Columns(5, {})
    assert not evaluate(Eq("category", "a"), absent).any()
    assert evaluate(Exists("category", False), absent).all()
    assert cols.records(np.array([3, 4]), ["category", "qty"]) == [
        {"category": "a", "qty": 4},
        {"category": "c", "qty": None},
    ]
    # the delta's growing form: appends never change an earlier snapshot
    growing = GrowingColumns()
    growing.append(table.slice(0, 2), 2)
    before = growing.snapshot()
    growing.append(pa.table({"brand": ["x", "y", "z"]}), 3)
    after = growing.snapshot()
    assert before.n == 2 and "brand" not in before.columns
    assert evaluate(Eq("category", "a"), after).tolist() == [True, False, False, False, False]
    assert after.records(np.array([1, 4]), ["category", "brand"]) == [
        {"category": "b", "brand": None},
        {"category": None, "brand": "z"},
    ]
    assert growing.table(1, 3).to_pydict()["category"] == ["b", None]


# ---- a real store, filtered --------------------------------------------------------------------
def _catalogue(rng, n: int, start: int = 0):
    """Clustered unit vectors with metadata correlated with the clusters (category) and not
    (price, in_stock, qty), like a product catalogue."""
    centres = np.random.default_rng(0).standard_normal((40, DIM)).astype(np.float32)
    label = rng.integers(0, 40, n)
    x = centres[label] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"row-{start + i:06d}" for i in range(n)]
    meta = pa.table(
        {
            "category": [CATEGORIES[c % 20] for c in label],
            "price": np.round(rng.uniform(1, 500, n), 2),
            "in_stock": rng.random(n) < 0.7,
            "qty": pa.array([None if i % 17 == 0 else int(i % 100) for i in range(n)], pa.int64()),
        }
    )
    return ids, x, meta


@pytest.fixture
def catalogue(tmp_path):
    """A fresh store per test (the second one writes, deletes and rebuilds)."""
    rng = np.random.default_rng(7)
    ids, x, meta = _catalogue(rng, N)
    store = write_store(
        tmp_path / "store",
        ids,
        [f"mem://{i}" for i in ids],
        x,
        SHARDS,
        metadata=meta,
    )
    for shard in range(SHARDS):
        rebuild_shard(store, shard)
    return store, ids, x, meta


def _live(store, shard: int) -> LiveShard:
    return load_live_shard(store, shard, load_manifest(store).shards[shard].dir, DIM, "ip")


def _exact(x, ids, mask, q, k):
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        return [[] for _ in q]
    x16 = x[rows].astype(np.float16)
    scores, found = exact_search(q, x16, min(k, len(rows)), "ip")
    return [[ids[rows[j]] for j in f if j >= 0] for f in found]


def test_filtered_search_keeps_recall_at_every_selectivity(catalogue):
    store, ids, x, meta = catalogue
    manifest = load_manifest(store)
    assert manifest.metadata == SCHEMA
    views = [_live(store, s) for s in range(SHARDS)]
    assert views[0].base.meta["kind"] == "ivfpq" and views[0].base.metadata_schema == SCHEMA
    queries = _catalogue(np.random.default_rng(99), 40, start=10**6)[1]
    cols = Columns.from_arrow(meta)
    filters = {
        "all in stock": {"field": "in_stock", "eq": True},  # ~70 %
        "cheap": {"field": "price", "range": {"lt": 50}},  # ~10 %
        "one category": {"field": "category", "eq": "cat03"},  # ~5 %, clustered
        "category and price": {
            "and": [
                {"field": "category", "in": ["cat03", "cat11"]},
                {"field": "price", "range": {"lt": 100}},
            ]
        },
        "very few": {
            "and": [{"field": "category", "eq": "cat03"}, {"field": "price", "range": {"lt": 25}}]
        },
        "none": {"field": "category", "eq": "no-such-category"},
    }
    methods = set()
    for name, body in filters.items():
        flt = parse_filter(body, manifest.metadata)
        mask = evaluate(flt, cols)
        truth = _exact(x, ids, mask, queries, 10)
        found, recalls = [], []
        for i, q in enumerate(queries):
            per_shard = []
            for view in views:
                hits, plan = view.search_with_plan(
                    q, 10, filter=flt, fields=["category", "price"], candidates=200
                )
                methods.add(plan.method)
                per_shard.append(hits[0])
            merged = sorted((h for hs in per_shard for h in hs), key=lambda h: (-h.score, h.id))
            got = [h.id for h in merged[:10]]
            for h in merged:
                row = meta.slice(ids.index(h.id), 1).to_pylist()[0]
                assert h.metadata == {"category": row["category"], "price": row["price"]}
                assert evaluate(flt, Columns.from_arrow(meta.slice(ids.index(h.id), 1)))[0]
            found.append(got)
            if truth[i]:
                recalls.append(len(set(got) & set(truth[i])) / len(truth[i]))
            else:
                assert got == []
        if recalls:
            assert np.mean(recalls) >= 0.95, (name, np.mean(recalls))
        assert sum(map(len, found)) == sum(map(len, truth)), name  # k rows whenever k exist
    assert methods == {"exact", "ivf", "none"}


def test_delta_tombstones_records_and_rebase_carry_metadata(catalogue):
    store, ids, x, meta = catalogue
    shard = shard_of(ids[0], SHARDS)
    view = _live(store, shard)
    flt = parse_filter({"field": "category", "eq": "brand-new"}, {**SCHEMA, "brand": "string"})
    q = x[0]
    assert view.search(q, 5, filter=flt) == [[]]
    # a writer's hand-over (POST /images) and a part another writer left in the store
    new_ids = [i for i in (f"new-{j}" for j in range(40)) if shard_of(i, SHARDS) == shard][:3]
    vecs = np.stack([q, -q, q]).astype(np.float32)
    added = pa.table({"category": ["brand-new", "brand-new", "other"], "brand": ["b1", None, "b2"]})
    t = schema.embeddings_table(
        new_ids,
        ["u0", "u1", "u2"],
        vecs,
        extra=dict(zip(added.column_names, added.columns, strict=True)),
    )
    part = write_rows(store, shard, t)
    view.add_rows(part, new_ids, ["u0", "u1", "u2"], vecs, [1, 1, 1], metadata=added)
    hits = view.search(q, 5, filter=flt, fields=["category", "brand", "price"])[0]
    assert [h.id for h in hits] == [new_ids[0], new_ids[1]]
    assert hits[0].metadata == {"category": "brand-new", "brand": "b1", "price": None}
    other = LiveShard(store, shard, view.base, DIM, "ip")
    other.refresh()  # the same rows read back from the part (typed columns in Parquet)
    assert [h.id for h in other.search(q, 5, filter=flt)[0]] == [new_ids[0], new_ids[1]]
    assert other.record_of(new_ids[2])["metadata"] == {"category": "other", "brand": "b2"}
    # a base row: its record carries every column; a tombstone hides it from filtered search
    base_row = next(i for i in ids if shard_of(i, SHARDS) == shard)
    row = meta.slice(ids.index(base_row), 1).to_pylist()[0]
    record = view.record_of(base_row)
    assert record["source"] == "index" and record["metadata"] == row
    assert view.record_of(base_row, ["qty"])["metadata"] == {"qty": row["qty"]}
    same = parse_filter({"field": "category", "eq": row["category"]}, SCHEMA)
    vec = x[ids.index(base_row)]
    assert view.search(vec, 1, filter=same)[0][0].id == base_row
    tomb, ms = write_tombstones(store, shard, [base_row])
    view.add_tombstones(tomb, [base_row], [ms])
    assert base_row not in {h.id for h in view.search(vec, 50, filter=same)[0]}
    assert view.record_of(base_row) is None
    # a new base version: the delta rows it does not cover keep their metadata
    rebased = view.rebased(ShardIndex.load(store, shard))
    assert rebased.record_of(new_ids[0])["metadata"] == {"category": "brand-new", "brand": "b1"}
    assert [h.id for h in rebased.search(q, 5, filter=flt)[0]] == [new_ids[0], new_ids[1]]
    # a rebuild folds the delta rows and their typed columns into rows.parquet
    evolve_metadata(store, {"brand": "string"})
    rebuild_shard(store, shard)
    fresh = _live(store, shard)
    assert fresh.stats()["delta"] == 0
    assert fresh.record_of(new_ids[0])["metadata"]["brand"] == "b1"
    assert fresh.base.metadata_schema == {**SCHEMA, "brand": "string"}
    assert [h.id for h in fresh.search(q, 5, filter=flt)[0]] == [new_ids[0], new_ids[1]]
    assert base_row not in {h.id for h in fresh.search(vec, 50, filter=same)[0]}
    assert set(shards_of(new_ids, SHARDS)) == {shard}


def test_plan_probes_where_the_allowed_rows_are():
    from index.ann.filter_plan import ivf_nprobe, prefer_exact

    sizes = np.full(100, 100)  # 100 lists of 100 rows, nearest first
    # uniform 10 %: twice the rows an unfiltered search scans at nprobe 4 (2 * 4 * 100 = 800)
    probe, scanned = ivf_nprobe(np.full(100, 10), sizes, 4, 10_000)
    assert (probe, scanned) == (80, 8000)
    # everything allowed: the base nprobe and the list rule (4 x 4 lists with allowed rows)
    assert ivf_nprobe(np.full(100, 100), sizes, 4, 10_000)[0] == 16
    # a category in a few full lists, not the nearest ones: 16 lists that hold any of it
    counts = np.zeros(100, int)
    counts[[30, 31, 50, 51, 52, 60, 61, 62, 63, 64, 70, 71, 72, 73, 74, 75, 90]] = 100
    assert ivf_nprobe(counts, sizes, 4, 10_000)[0] == 76
    # fewer allowed rows than the target: every list holding one, no more
    counts = np.zeros(100, int)
    counts[[5, 40]] = 3
    assert ivf_nprobe(counts, sizes, 4, 10_000)[0] == 41
    assert prefer_exact(6, 41 * 100) and not prefer_exact(100, 41 * 100)
