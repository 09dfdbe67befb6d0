"""A store's learned transform (#25.5): PCA learned by the first build, applied to every row
and query (``index.ann.transform``, ``index.live.transform_fit``).

What must hold: the written rule picks PCA only for measured models with enough rows and never
for routed stores; the transform is learned once, before any shard is built, and refused
afterwards; a store with one indexes reduced vectors (the version's float16 rerank vectors are
``d``-d) while its Parquet parts keep the model's; queries in the model's space find the same
rows as exact search in the reduced space; delta rows (handed over or read from the store) are
transformed too; a vector read back by id is searched as it is; a rebuild keeps the space.
Small dims, no Ray.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.stores import write_store
from harness.synthetic import gaussian_mixture
from index.ann.exact import exact_search
from index.ann.transform import (
    Transform,
    TransformError,
    TransformSpec,
    choose_transform,
    learn_transform,
    load_transform,
)
from index.live.delta import load_live_shard
from index.live.parts import write_rows
from index.live.rebuild import RebuildOptions, rebuild_shard
from index.live.transform_fit import ensure_transform
from index.rows import schema
from index.storage.manifest import load_manifest

DIM = 64
OUT = 16
ROWS = 2000
SHARDS = 2


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(rows: int = ROWS, seed: int = 0) -> np.ndarray:
    # a mixture in a 24-d subspace of 64-d: PCA to 16-d keeps most of it
    x = gaussian_mixture(rows, 24, clusters=30, seed=seed)
    basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((DIM, 24)))[0]
    return _unit(x @ basis.T)


def _ids(n: int, prefix: str = "r") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def test_rule_picks_pca_only_where_measured_with_enough_rows():
    spec, why = choose_transform("auto", "efficientnet_lite0@default", 1280, 20_000)
    assert spec == TransformSpec(128) and "whitening.json" in why
    assert choose_transform("auto", "efficientnet_lite0@default", 1280, 1_000)[0] is None
    assert choose_transform("auto", "test-model@none", 1280, 10**6)[0] is None
    assert choose_transform("auto", "efficientnet_lite0@x", 1280, 10**6, "routed")[0] is None
    assert choose_transform("none", "efficientnet_lite0@x", 1280, 10**6)[0] is None
    assert choose_transform("whiten:8", "m@w", 64, 100)[0] == TransformSpec(8, -0.5)
    with pytest.raises(TransformError, match="routed"):
        choose_transform("pca:8", "m@w", 64, 1000, "routed")
    with pytest.raises(TransformError, match="at least"):
        choose_transform("pca:32", "m@w", 64, 40)
    with pytest.raises(TransformError, match="does not reduce"):
        choose_transform("pca:64", "m@w", 64, 1000)
    with pytest.raises(TransformError, match="pca:D"):
        choose_transform("pca", "m@w", 64, 1000)


def test_transform_round_trips_and_keeps_neighbours():
    x = _data()
    t = learn_transform(x, TransformSpec(OUT), "ip")
    y = t.apply(x)
    assert y.shape == (ROWS, OUT) and np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    again = Transform.from_bytes(t.to_bytes())
    assert again.digest == t.digest and np.allclose(again.apply(x[:5]), y[:5], atol=1e-6)
    # the data lies in 24 dimensions: 16 of them keep most of each point's neighbours
    truth = exact_search(x[:100], x, 10, "ip")[1]
    found = exact_search(y[:100], y, 10, "ip")[1]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    assert overlap > 0.6
    with pytest.raises(TransformError, match="expected"):
        t.apply(y)


def test_store_learns_once_indexes_reduced_and_serves_model_space_queries(tmp_path):
    x = _data()
    ids = _ids(ROWS)
    store = write_store(tmp_path / "s", ids, ids, x, SHARDS)
    path, why = ensure_transform(store, f"pca:{OUT}")
    manifest = load_manifest(store)
    assert manifest.transform == path and path.startswith("_transform/") and "asked" in why
    transform = load_transform(store, manifest)
    assert (transform.in_dim, transform.out_dim) == (DIM, OUT)
    assert ensure_transform(store, "auto")[0] == path  # kept, once chosen
    with pytest.raises(TransformError, match="mix spaces"):
        ensure_transform(store, "pca:8")

    for shard in range(SHARDS):
        summary = rebuild_shard(store, shard, RebuildOptions(memory_budget="64M"))
        assert summary["built"], summary
    manifest = load_manifest(store)
    views = []
    for shard in range(SHARDS):
        state = manifest.shards[shard]
        view = load_live_shard(store, shard, state.dir, DIM, "ip", transform)
        assert view.dim == OUT and view.base.dim == OUT and view.base.meta["transform"] == path
        assert view.base.meta["dim"] == OUT
        views.append(view)
    # the parts keep the model's vectors: the source of truth, what the model tag guards
    parts = store.list_parts(0)
    table = store.read_parquet([store.path(p) for p in parts])
    assert table.schema.field(schema.EMBEDDING).type.list_size == DIM
    # a built store refuses to learn another one, or one at all when built without
    other = write_store(tmp_path / "t", ids, ids, x, 1)
    rebuild_shard(other, 0, RebuildOptions(memory_budget="64M"))
    assert ensure_transform(other, "auto") == (None, "none: the store was first built without one")
    with pytest.raises(TransformError, match="first built without"):
        ensure_transform(other, f"pca:{OUT}")

    # model-space queries find what exact search in the reduced space finds
    queries = x[:50]
    reduced = transform.apply(x)
    truth = exact_search(transform.apply(queries), reduced, 1, "ip")[1][:, 0]
    for i, q in enumerate(queries):
        hits = sorted((h for v in views for h in v.search(q[None], 1)[0]), key=lambda h: -h.score)
        assert hits[0].id == ids[truth[i]]

    # a row handed over in the model's space is searchable, transformed; read back by id, its
    # vector is the store's and searches as it is
    new = _data(1, seed=7)
    views[0].add_rows("part-new", ["fresh"], ["fresh"], new, [10**13])
    assert views[0].search(new, 1)[0][0].id == "fresh"
    back = views[0].vector_of("fresh")
    assert back.shape == (OUT,) and np.allclose(back, transform.apply(new)[0], atol=1e-2)
    assert views[0].search(back[None], 1)[0][0].id == "fresh"
    assert views[0].search_exact(new, 1)[0][0].id == "fresh"

    # rows written to the store are read through the transform, and a rebuild keeps the space
    more = _data(200, seed=3)
    more_ids = _ids(200, "m")
    write_rows(store, 1, schema.embeddings_table(more_ids, more_ids, more))
    fresh_view = load_live_shard(store, 1, manifest.shards[1].dir, DIM, "ip", transform)
    assert fresh_view.stats()["delta"] == 200
    assert fresh_view.search(more[:1], 1)[0][0].id == "m00000"
    summary = rebuild_shard(store, 1, RebuildOptions(memory_budget="64M"))
    assert summary["built"]
    rebuilt = load_live_shard(store, 1, load_manifest(store).shards[1].dir, DIM, "ip", transform)
    assert rebuilt.base.dim == OUT and rebuilt.stats()["delta"] == 0
    assert rebuilt.search(more[:1], 1)[0][0].id == "m00000"
