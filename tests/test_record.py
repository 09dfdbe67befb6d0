"""``LiveShard.record_of`` (``GET /images/{id}``): the row as the shard serves it now.

Base rows come from the live version's ``rows.parquet``, delta rows from their parts; a base row
hidden by a tombstone or superseded by a newer delta row answers as the delta does, or not at all.
No Ray: a one-shard store of random vectors, a flat index, the same functions the app calls.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from harness.stores import write_store
from index.live.delta import load_live_shard
from index.live.parts import write_rows, write_tombstones
from index.live.rebuild import rebuild_shard
from index.rows import schema
from index.storage.manifest import load_manifest

DIM = 8


def test_record_of_base_delta_and_tombstones(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"r{i:02d}" for i in range(20)]
    store = write_store(tmp_path / "s", ids, [f"/photos/{i}.jpg" for i in ids], x, 1)
    rebuild_shard(store, 0)
    state = load_manifest(store).shards[0]
    view = load_live_shard(store, 0, state.dir, DIM, "ip")

    record = view.record_of("r03")
    assert record.pop("ingested_at_ms") >= 0
    assert record == {
        "id": "r03",
        "uri": "/photos/r03.jpg",
        "shard": 0,
        "version": state.version,
        "source": "index",
        "metadata": {},  # the store has no metadata columns (issue #13: test_filtered_index)
    }
    assert view.record_of("nope") is None

    # a newer row with the same id (a re-upload) supersedes the base row's uri
    at = pa.scalar(schema.now_ms().value + 1, schema.TIMESTAMP)
    table = schema.embeddings_table(
        ["r03", "new"], ["s3://b/r03.jpg", "s3://b/new.jpg"], x[:2], ingested_at=at
    )
    part = write_rows(store, 0, table)
    ingested = [int(at.value)] * 2
    view.add_rows(part, ["r03", "new"], ["s3://b/r03.jpg", "s3://b/new.jpg"], x[:2], ingested)
    assert view.record_of("r03")["uri"] == "s3://b/r03.jpg"
    assert view.record_of("new")["source"] == "delta"

    # deleted rows are unknown, in the base and in the delta
    tomb, ms = write_tombstones(store, 0, ["r07", "new"], int(at.value) + 1)
    view.add_tombstones(tomb, ["r07", "new"], [ms, ms])
    assert view.record_of("r07") is None and view.record_of("new") is None
    assert view.record_of("r08")["uri"] == "/photos/r08.jpg"
