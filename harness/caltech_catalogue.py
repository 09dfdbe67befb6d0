"""Caltech-101 as a catalogue built the production way, for the answer-quality benchmarks.

``split`` lists the ``train.txt`` / ``test.txt`` photos (``BACKGROUND_Google`` left out: it is
not a class); ``build_catalogue`` embeds photos with the real Ray Data job
(``pipelines.embed.run_job``, Ray must be initialised) into a store and builds every shard's
index (``index.live.rebuild``); ``catalogue_vectors`` reads the rows back for exact search.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from index.live.rebuild import rebuild_shard
from index.rows import schema
from index.storage.manifest import load_manifest
from index.storage.store import Store
from pipelines.embed import run_job
from pipelines.embed_config import EmbedJobConfig

SKIP_CLASS = "BACKGROUND_Google"


def split(caltech: Path, name: str) -> list[Path]:
    """The photos a split file (``train.txt``, ``test.txt``) lists, in its order."""
    lines = (caltech / name).read_text().split()
    return [caltech / "101_ObjectCategories" / x for x in lines if x.split("/")[0] != SKIP_CLASS]


def class_of(uri: str) -> str:
    return Path(uri).parent.name


def build_catalogue(
    workdir: Path, shards: int, photos: list[Path], model: str | None = None, weights=None
) -> dict:
    """``workdir/store-<shards>`` embedded by the real job (the job's default model unless
    ``model``/``weights``) and indexed; the store URI, the job's summary and the timings."""
    store_uri = str(workdir / f"store-{shards}")
    listing = workdir / "train-list.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    t = time.perf_counter()
    chosen = {"model": model, "weights": weights} if model else {}
    summary = run_job(
        EmbedJobConfig(input=[str(listing)], store=store_uri, num_shards=shards, **chosen)
    )
    info = {"store": store_uri, "embed": summary.to_dict(), "embed_s": time.perf_counter() - t}
    print(summary.line())
    store = Store(store_uri)
    t = time.perf_counter()
    for shard in range(shards):
        r = rebuild_shard(store, shard)
        if r["built"]:
            print(f"shard {shard}: {r['count']} rows, {r['dir']}")
    info["build_s"] = time.perf_counter() - t
    return info


def catalogue_vectors(store_uri: str) -> tuple[list[str], list[str], np.ndarray]:
    """Ids, URIs and vectors of every row of the store's parts."""
    store = Store(store_uri)
    manifest = load_manifest(store)
    parts = [store.path(p) for s in range(manifest.num_shards) for p in store.list_parts(s)]
    table = store.read_parquet(parts, columns=[schema.ID, schema.URI, schema.EMBEDDING])
    vectors = schema.arrow_to_vectors(table[schema.EMBEDDING])
    return table[schema.ID].to_pylist(), table[schema.URI].to_pylist(), vectors
