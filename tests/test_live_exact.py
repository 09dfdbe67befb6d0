"""``LiveShard.search_exact``: the recall canary's reference is brute force over exactly the rows
the shard serves now (base rows not deleted or superseded, plus live delta rows). No Ray."""

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


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_search_exact_sees_the_visible_rows_only(tmp_path):
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((40, DIM)))
    ids = [f"r{i:02d}" for i in range(40)]
    store = write_store(tmp_path / "s", ids, [f"/p/{i}" for i in ids], x, 1)
    rebuild_shard(store, 0)
    view = load_live_shard(store, 0, load_manifest(store).shards[0].dir, DIM, "ip")

    at = pa.scalar(schema.now_ms().value + 1, schema.TIMESTAMP)
    fresh = unit(rng.standard_normal((2, DIM)))  # r05 moved, and a new row
    table = schema.embeddings_table(["r05", "new"], ["/q/r05", "/q/new"], fresh, ingested_at=at)
    part = write_rows(store, 0, table)
    view.add_rows(part, ["r05", "new"], ["/q/r05", "/q/new"], fresh, [int(at.value)] * 2)
    tomb, ms = write_tombstones(store, 0, ["r09", "r11"], int(at.value) + 1)
    view.add_tombstones(tomb, ["r09", "r11"], [ms, ms])

    visible = {i: v for i, v in zip(ids, x, strict=True) if i not in ("r05", "r09", "r11")}
    visible |= {"r05": fresh[0], "new": fresh[1]}
    names = list(visible)
    matrix = np.stack([visible[i] for i in names]).astype(np.float16).astype(np.float32)
    for q in unit(rng.standard_normal((5, DIM))):
        got = [h.id for h in view.search_exact(q, 10)[0]]
        want = [names[j] for j in np.argsort(-(matrix @ q), kind="stable")[:10]]
        assert got == want
        assert got == [h.id for h in view.search(q[None], 10)[0]]  # flat: search is exact too
