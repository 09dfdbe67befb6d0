"""Stores without running the model: write rows of embeddings as the embedding job does, read
them back, and load an ann-benchmarks file (tests and benchmarks alike)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.ann.routing import Router, route_region_rows, save_router
from index.rows import schema
from index.rows.metadata import schema_of_table
from index.rows.sharding import shards_of
from index.storage.manifest import Manifest, commit_manifest, load_manifest
from index.storage.store import Store


def write_store(
    root: str | os.PathLike[str] | Store,
    ids: Sequence[str],
    uris: Sequence[str],
    vectors: np.ndarray,
    num_shards: int,
    metric: str = "ip",
    *,
    model: str = "test-model",
    weights: str = "none",
    part_key: str = "0",
    metadata: pa.Table | None = None,
    part_rows: int | None = None,
    router: Router | None = None,
) -> Store:
    """Write rows into ``embeddings/shard=NNNNN/part-<part_key>.parquet`` routed by ``shard_of``
    (as the embedding job does) and commit a manifest for them (creating it if needed).

    Calling it again with another ``part_key`` appends a new part to each shard: new data for
    the index build to pick up. ``metadata`` (one row per id) is stored as typed columns and
    its schema merged into the manifest's, as the embedding job does with a sidecar table.
    ``part_rows`` splits each shard's rows into parts of at most that many rows. With a
    ``router`` (``index.ann.routing``) the store is in the routed layout: rows go to their
    vectors' shards (region rows to their image's) and the manifest names the router.
    """
    store = root if isinstance(root, Store) else Store(root)
    vectors = np.asarray(vectors, dtype=np.float32)
    if router is None:
        shards = shards_of(ids, num_shards)
    else:
        shards = route_region_rows(list(ids), router.shards_of(vectors))
        router_path = save_router(store, router)
    ids_arr, uris_arr = np.asarray(ids, dtype=object), np.asarray(uris, dtype=object)
    columns = schema_of_table(metadata) if metadata is not None else {}
    for shard in range(num_shards):
        rows = np.flatnonzero(shards == shard)
        step = part_rows or max(1, len(rows))
        for i, start in enumerate(range(0, len(rows), step)):
            sel = rows[start : start + step]
            extra = None
            if metadata is not None:
                part = metadata.take(pa.array(sel))
                extra = {name: part[name].combine_chunks() for name in part.column_names}
            table = schema.embeddings_table(
                list(ids_arr[sel]), list(uris_arr[sel]), vectors[sel], extra=extra
            )
            key = f"{part_key}-{i:04d}" if part_rows else part_key
            store.write_parquet(table, f"{store.embeddings_dir(shard)}/{store.new_part_name(key)}")

    def update(m: Manifest | None) -> Manifest:
        if m is None:
            routed = {"layout": "routed", "router": router_path} if router is not None else {}
            m = Manifest(model, weights, vectors.shape[1], num_shards, metric, **routed)
        m.check_compatible(model, weights, vectors.shape[1], num_shards)
        if router is not None and m.router != router_path:
            raise ValueError(f"the store is routed by {m.router}, not {router_path}")
        return m.with_metadata(columns)

    commit_manifest(store, update)
    return store


def read_store(root: str | os.PathLike[str]) -> tuple[dict[str, list], list[str]]:
    """All embedding rows of a store (plus the shard each part sits in) and its part paths."""
    store = Store(root)
    manifest = load_manifest(store)
    rows: dict[str, list] = {k: [] for k in ("id", "uri", "vec", "w", "h", "shard")}
    parts = []
    for shard in range(manifest.num_shards):
        for rel in store.list_parts(shard):
            parts.append(rel)
            t = pq.read_table(store.path(rel))
            rows["id"] += t[schema.ID].to_pylist()
            rows["uri"] += t[schema.URI].to_pylist()
            rows["vec"].append(schema.arrow_to_vectors(t[schema.EMBEDDING]))
            rows["w"] += t[schema.WIDTH].to_pylist()
            rows["h"] += t[schema.HEIGHT].to_pylist()
            rows["shard"] += [shard] * t.num_rows
    rows["vec"] = np.concatenate(rows["vec"]) if rows["vec"] else np.zeros((0, 0), np.float32)
    return rows, parts


def load_ann(path: str | Path) -> dict:
    """An ann-benchmarks HDF5 file: train/test vectors, exact neighbours, metric ("ip"/"l2").

    Angular files are L2-normalised here (cosine == inner product on unit vectors).
    """
    with h5py.File(path, "r") as f:
        train = np.asarray(f["train"], dtype=np.float32)
        test = np.asarray(f["test"], dtype=np.float32)
        neighbors = np.asarray(f["neighbors"], dtype=np.int64)
        distance = f.attrs["distance"]
    distance = distance.decode() if isinstance(distance, bytes) else str(distance)
    metric = "ip" if distance == "angular" else "l2"
    if metric == "ip":
        train /= np.linalg.norm(train, axis=1, keepdims=True)
        test /= np.linalg.norm(test, axis=1, keepdims=True)
    return {"train": train, "test": test, "neighbors": neighbors, "metric": metric}
