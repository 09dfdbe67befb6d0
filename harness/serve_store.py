"""A small real store for the Serve tests: real photos, really embedded, real indexes.

Embedding in-process with ``Embedder`` (no Ray Data job) keeps it to a few seconds; the rows are
written with ``harness.stores.write_store`` and indexed with ``index.live.rebuild``, exactly
as the pipelines do, so the Serve graph sees what it sees in production.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedding import Embedder, ModelConfig
from harness.stores import write_store
from index.live.rebuild import rebuild_shard
from index.rows.sharding import uri_id
from index.storage.store import Store
from serve.http.crop import image_crop
from serve.http.limits import Limits


def caltech_sample(caltech_dir: Path, classes: int, per_class: int) -> list[Path]:
    """The first ``per_class`` train images of the first ``classes`` classes (sorted, fixed)."""
    by_class: dict[str, list[str]] = {}
    for line in (caltech_dir / "train.txt").read_text().split():
        cls = line.split("/")[0]
        if cls != "BACKGROUND_Google":
            by_class.setdefault(cls, []).append(line)
    picked = []
    for cls in sorted(by_class)[:classes]:
        picked += sorted(by_class[cls])[:per_class]
    return [caltech_dir / "101_ObjectCategories" / p for p in picked]


def embed_files(paths: list[Path], embedder: Embedder) -> tuple[np.ndarray, float]:
    """Vectors of image files, with the query path's crop (the batch job's, see the contract
    test ``test_query_crop_is_the_batch_jobs_crop``), 32 at a time; and the seconds spent inside
    the model."""
    out, model_s = [], 0.0
    for start in range(0, len(paths), 32):
        crops = [
            image_crop(p.read_bytes(), embedder.crop, Limits()) for p in paths[start : start + 32]
        ]
        t = time.perf_counter()
        out.append(embedder.embed(np.stack(crops)))
        model_s += time.perf_counter() - t
    return np.concatenate(out), model_s


def write_caltech_store(
    root: Path | str,
    paths: list[Path],
    num_shards: int,
    model: ModelConfig | None = None,
    metadata: pa.Table | None = None,
) -> tuple[Store, dict[str, np.ndarray]]:
    """Embed ``paths`` into a new store with ``num_shards`` built, live shards (``metadata``: one
    row per path, stored as typed columns).

    Returns the store and ``uri -> vector`` (what the catalogue holds, for exact comparisons).
    """
    embedder = Embedder(model or ModelConfig())
    vectors, _ = embed_files(paths, embedder)
    uris = [p.resolve().as_uri() for p in paths]
    store = write_store(
        root,
        [uri_id(u) for u in uris],
        uris,
        vectors,
        num_shards,
        model=embedder.name,
        weights=embedder.weights_tag,
        metadata=metadata,
    )
    for shard in range(num_shards):
        rebuild_shard(store, shard)
    return store, dict(zip(uris, vectors, strict=True))


def search_in_process(store_uri: str, queries: np.ndarray, k: int, warm: int = 20):
    """Each query's top-``k`` ids from the store's live shards searched as one replica searches
    them (``ShardSearcher``: index, rerank, a store's region collapse), one query at a time
    after ``warm`` untimed ones; and each query's milliseconds."""
    import asyncio

    from index.storage.manifest import load_manifest
    from serve.deployments.searcher import ShardSearcher

    shards = list(range(load_manifest(Store(store_uri)).num_shards))

    async def run():
        searcher = ShardSearcher.func_or_class(
            store_uri, shards, reload_interval_s=0, delta_poll_s=0, batch_wait_s=0
        )
        try:
            for q in queries[:warm]:  # pages in the index, starts the threads
                await searcher.search(q, k)
            answers, ms = [], []
            for q in queries:
                t = time.perf_counter()
                answers.append((await searcher.search(q, k))["ids"])
                ms.append((time.perf_counter() - t) * 1000)
            return answers, ms
        finally:
            searcher._stop.set()

    return asyncio.run(run())
