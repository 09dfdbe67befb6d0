"""Caltech-101 as a catalogue built the production way, for the answer-quality benchmarks.

``split`` lists the ``train.txt`` / ``test.txt`` photos (``BACKGROUND_Google`` left out: it is
not a class) and ``round_robin`` orders them class by class; ``build_catalogue`` embeds photos
with the real Ray Data job (``pipelines.embed.run_job``, Ray must be initialised) into a store
and builds every shard's index (``index.live.rebuild``); ``catalogue_vectors`` reads the rows
back for exact search, ``exact_images`` ranks images by their best row (a store with regions).
``area_crop`` / ``crop_queries``: crops of catalogue photos as queries (instance search).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from index.live.rebuild import rebuild_shard
from index.rows import schema
from index.rows.regions import parent_of
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


def round_robin(photos: list[Path]) -> list[Path]:
    """``photos`` one class at a time: every class's first photo before any class's second."""
    by_class: dict[str, list[Path]] = {}
    for p in photos:
        by_class.setdefault(p.parent.name, []).append(p)
    order = []
    for rank in range(max(map(len, by_class.values()), default=0)):
        order += [by_class[c][rank] for c in sorted(by_class) if rank < len(by_class[c])]
    return order


def area_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A seeded crop of 20-50 % of the picture's area (aspect 0.75-1.33), anywhere in it."""
    w, h = img.size
    area = rng.uniform(0.2, 0.5)
    aspect = rng.uniform(0.75, 1.33)
    cw = int(min(w, round(w * np.sqrt(area * aspect))))
    ch = int(min(h, round(h * np.sqrt(area / aspect))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def crop_queries(photos: list[Path], n: int, seed: int, folder: Path) -> tuple[list, list]:
    """``n`` ``area_crop`` crops of seeded ``photos``, as JPEG files in ``folder``; and each
    crop's source photo."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, sources = [], []
    for i, j in enumerate(rng.choice(len(photos), size=n, replace=n > len(photos))):
        path = folder / f"crop-{i:04d}.jpg"
        area_crop(Image.open(photos[j]).convert("RGB"), rng).save(path, "JPEG", quality=90)
        paths.append(path)
        sources.append(photos[j])
    return paths, sources


def build_catalogue(
    workdir: Path,
    shards: int,
    photos: list[Path],
    model: str | None = None,
    weights=None,
    regions: int = 1,
) -> dict:
    """``workdir/store-<shards>`` (``-r<regions>`` with region rows) embedded by the real job
    (the job's default model unless ``model``/``weights``; ``regions``: grid levels, ``embed
    --regions``) and indexed; the store URI, the job's summary and the timings."""
    store_uri = str(workdir / (f"store-{shards}" + (f"-r{regions}" if regions > 1 else "")))
    listing = workdir / "train-list.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    t = time.perf_counter()
    chosen = {"model": model, "weights": weights} if model else {}
    summary = run_job(
        EmbedJobConfig(
            input=[str(listing)], store=store_uri, num_shards=shards, regions=regions, **chosen
        )
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


def exact_images(store_uri: str, queries: np.ndarray, k: int) -> list[list[str]]:
    """The top-``k`` image ids per query by exact search, each image scored by its best row
    (its own and its regions', ``index.rows.regions``)."""
    ids, _, x = catalogue_vectors(store_uri)
    names, index = np.unique([parent_of(i) for i in ids], return_inverse=True)
    order = np.argsort(index, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(index[order]) != 0])
    best = np.maximum.reduceat(queries @ x[order].T, starts, axis=1)  # (queries, images)
    return [[str(names[j]) for j in row] for row in np.argsort(-best, axis=1)[:, :k]]


def catalogue_vectors(store_uri: str) -> tuple[list[str], list[str], np.ndarray]:
    """Ids, URIs and vectors of every row of the store's parts."""
    store = Store(store_uri)
    manifest = load_manifest(store)
    parts = [store.path(p) for s in range(manifest.num_shards) for p in store.list_parts(s)]
    table = store.read_parquet(parts, columns=[schema.ID, schema.URI, schema.EMBEDDING])
    vectors = schema.arrow_to_vectors(table[schema.EMBEDDING])
    return table[schema.ID].to_pylist(), table[schema.URI].to_pylist(), vectors
