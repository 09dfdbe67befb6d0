"""The embedding job's metadata without Ray: sidecar tables read, typed, routed per shard and
joined to the staged inputs by URI; bad rows counted; a schema conflict refused before a write."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.stores import write_store
from index.rows import schema
from index.rows.sharding import uri_id
from index.storage.manifest import ManifestMismatch, evolve_metadata, load_manifest
from pipelines.embed import load_sidecar
from pipelines.embed_config import ConfigError, EmbedJobConfig, config_from_args
from pipelines.embed_plan import PlanCounts, ShardSpill, plan_pending
from pipelines.inputs import expand_inputs, iter_inputs
from pipelines.sidecar import Sidecar
from pipelines.tables import read_table_batches
from pipelines.uris import InputError

SHARDS = 3


def _images(tmp_path, n: int) -> list[str]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.jpg"
        path.write_bytes(b"not decoded here")
        paths.append(str(path))
    return paths


def _csv(path, rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = [",".join(keys)] + [
        ",".join("" if r[k] is None else str(r[k]) for k in keys) for r in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_tables_of_three_formats_resolve_uris_like_list_files(tmp_path):
    paths = _images(tmp_path, 3)
    csv = _csv(
        tmp_path / "imgs" / "meta.csv",
        [
            {"uri": "img000.jpg", "price": 9.5, "category": "shoes", "in_stock": "true"},
            {"uri": paths[1], "price": 12, "category": "boots", "in_stock": "false"},
            {"uri": "", "price": 1, "category": "x", "in_stock": "true"},
        ],
    )
    table = next(read_table_batches(csv))
    assert table[schema.URI].to_pylist() == [paths[0], paths[1], None]
    assert table.schema.field("price").type == pa.float64()
    assert table.schema.field("in_stock").type == pa.bool_()
    pq.write_table(pa.table({"uri": ["img002.jpg"], "qty": [3]}), tmp_path / "imgs" / "m.parquet")
    jsonl = tmp_path / "imgs" / "m.jsonl"
    jsonl.write_text(json.dumps({"uri": "img001.jpg", "tag": "sale"}) + "\n")
    assert next(read_table_batches(str(tmp_path / "imgs" / "m.parquet"))).to_pylist() == [
        {"uri": paths[2], "qty": 3}
    ]
    assert next(read_table_batches(str(jsonl))).to_pylist() == [{"uri": paths[1], "tag": "sale"}]
    # an input that is a table file names its inputs by its uri column
    assert list(iter_inputs([csv])) == paths[:2] == expand_inputs([csv])
    (tmp_path / "nouri.csv").write_text("path,price\na.jpg,1\n")
    with pytest.raises(InputError, match="needs a 'uri' column"):
        next(read_table_batches(str(tmp_path / "nouri.csv")))
    with pytest.raises(InputError, match="no such metadata table"):
        next(read_table_batches(str(tmp_path / "absent.csv")))
    dates = tmp_path / "dates.parquet"
    pq.write_table(pa.table({"uri": ["a.jpg"], "when": pa.array([0], pa.date32())}), dates)
    with pytest.raises(InputError, match="'when' has type date32"):
        Sidecar(SHARDS).load([str(dates)])
    with pytest.raises(ConfigError, match="metadata: 'x.txt'"):
        EmbedJobConfig(input=["a"], metadata=["x.txt"])
    config = config_from_args(["imgs", "--metadata", csv, "--metadata", str(jsonl)])
    assert config.metadata == [csv, str(jsonl)]


def test_sidecar_joins_staged_inputs_by_uri_and_counts_bad_rows(tmp_path):
    paths = _images(tmp_path, 40)
    store = write_store(tmp_path / "store", ["x"], ["x"], np.ones((1, 4), np.float32), SHARDS)
    rows = [
        {
            "uri": p,
            "price": 10 + i,
            "category": f"c{i % 4}",
            "in_stock": "true" if i % 2 else "false",
        }
        for i, p in enumerate(paths[:30])
    ]
    rows.append({"uri": paths[0], "price": 999, "category": "again", "in_stock": "true"})
    rows.append({"uri": None, "price": 1, "category": "no uri", "in_stock": "true"})
    csv = _csv(tmp_path / "meta.csv", rows)
    config = EmbedJobConfig(input=[str(tmp_path / "imgs")], store=store.uri, metadata=[csv])
    sidecar = load_sidecar(store, config, SHARDS)
    try:
        # the store's schema now has the columns (prices are whole numbers: int)
        assert load_manifest(store).metadata == {
            "price": "int",
            "category": "string",
            "in_stock": "bool",
        }
        spill = ShardSpill(SHARDS)
        spill.add_rows(paths, [uri_id(p) for p in paths])
        spill.finish()
        pending = plan_pending(
            store, spill, PlanCounts(), failed=None, limit=None, block_rows=8, sidecar=sidecar
        )
        spill.close()
        staged = pa.concat_tables([store.read_parquet([f[1]]) for f in pending.files])
        assert staged.num_rows == 40
        assert staged.column_names == ["uri", "id", "price", "category", "in_stock"]
        by_uri = {r["uri"]: r for r in staged.to_pylist()}
        assert by_uri[paths[0]]["price"] == 10 and by_uri[paths[0]]["category"] == "c0"
        assert by_uri[paths[3]] == {
            "uri": paths[3],
            "id": uri_id(paths[3]),
            "price": 13,
            "category": "c3",
            "in_stock": True,
        }
        assert by_uri[paths[35]]["price"] is None  # no row: null metadata, still embedded
        counts = sidecar.counts
        assert (counts.rows, counts.skipped, counts.duplicates) == (31, 1, 1)
        assert (counts.matched, counts.missing) == (30, 10)
    finally:
        sidecar.close()
    # a later table with float prices widens nothing (the store says int): refused, no write
    csv2 = _csv(tmp_path / "meta2.csv", [{"uri": paths[0], "price": 9.99}])
    sequence = load_manifest(store).sequence
    with pytest.raises(ManifestMismatch, match="'price' is int in this store but float"):
        load_sidecar(store, EmbedJobConfig(input=[paths[0]], store=store.uri, metadata=[csv2]), 3)
    assert load_manifest(store).sequence == sequence
    # the other way round widens: a float column takes whole numbers
    evolve_metadata(store, {"weight": "float"})
    csv3 = _csv(tmp_path / "meta3.csv", [{"uri": paths[0], "weight": 3}])
    sidecar = load_sidecar(
        store, EmbedJobConfig(input=[paths[0]], store=store.uri, metadata=[csv3]), 3
    )
    try:
        joined = sidecar.join(
            pa.table({"uri": [paths[0]], "id": [uri_id(paths[0])]}),
            0,
            every_shard=True,
        )
        assert joined.schema.field("weight").type == pa.float64()
        assert joined.to_pylist()[0]["weight"] == 3.0
    finally:
        sidecar.close()
