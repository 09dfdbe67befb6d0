"""A backbone through the whole batch path: the embedding job, the index build, the query crop.

``embed_and_build`` runs ``pipelines.embed.run_job`` and ``pipelines.build_index.run`` on a list
of photos into a fresh store and loads its shard indexes; ``self_retrieval`` sends catalogue
photos back as queries the way the HTTP ingress prepares them (``serve.http.crop.image_crop``),
and counts how often each finds itself first. Shared by ``tests/test_backbones.py`` and
``benchmarks/models.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedding.config import ModelConfig
from embedding.model import Embedder
from index.ann.shard_index import ShardIndex
from index.live.recall import search_all
from index.rows.sharding import uri_id
from index.storage.manifest import Manifest, load_manifest
from index.storage.store import Store
from pipelines.build_index import BuildConfig
from pipelines.build_index import run as build
from pipelines.embed import run_job
from pipelines.embed_config import EmbedJobConfig
from serve.http.crop import image_crop
from serve.http.limits import Limits


@dataclass
class BuiltStore:
    manifest: Manifest
    shards: list[ShardIndex]
    embedder: Embedder  # the query side's model, loaded as the QueryEmbedder loads it
    embed_seconds: float
    images_per_s: float


def embed_and_build(
    model: str,
    weights: str,
    photos: list[Path],
    root: Path,
    num_shards: int = 2,
    metadata: list[str] | None = None,
    transform: str = "auto",
) -> BuiltStore:
    """``metadata``: sidecar tables (a ``uri`` column and typed columns) stored with the rows;
    ``transform``: the build's (``index.ann.transform``: auto, none, pca:D, whiten:D)."""
    config = EmbedJobConfig(
        metadata=metadata or [],
        input=[str(p) for p in photos],
        store=str(root),
        num_shards=num_shards,
        batch_size=16,
        actors=1,
        model=model,
        weights=weights,
    )
    summary = run_job(config)
    if summary.errors or summary.embedded != len(photos):
        raise RuntimeError(f"{model}: {summary.line()}")
    build(BuildConfig(store=str(root), num_cpus=0.5, transform=transform))
    store = Store(root)
    shards = [ShardIndex.load(store, s) for s in range(num_shards)]
    embedder = Embedder(ModelConfig(name=model, weights=weights, threads=1))
    return BuiltStore(load_manifest(store), shards, embedder, summary.seconds, summary.images_per_s)


def query_vectors(embedder: Embedder, photos: list[Path]) -> np.ndarray:
    """Photos as the ingress embeds an upload: its crop, then the model."""
    crops = np.stack([image_crop(p.read_bytes(), embedder.crop, Limits()) for p in photos])
    return embedder.embed(crops)


def self_retrieval(built: BuiltStore, photos: list[Path]) -> float:
    """Share of ``photos`` (catalogue members) that find themselves first."""
    found = search_all(built.shards, query_vectors(built.embedder, photos), 1)
    return float(np.mean([f[:1] == [uri_id(str(p))] for f, p in zip(found, photos, strict=True)]))


def modality_gap(images: np.ndarray, texts: np.ndarray) -> dict:
    """How far apart the text and image vectors lie (unit vectors): mean cosine within each
    modality and across, and the distance between the two centroids (Liang et al.'s gap)."""

    def mean_cos(a: np.ndarray, b: np.ndarray, same: bool) -> float:
        sims = a @ b.T
        if same:
            n = len(a)
            return float((sims.sum() - np.trace(sims)) / max(1, n * n - n))
        return float(sims.mean())

    return {
        "image_image_cos": mean_cos(images, images, True),
        "text_text_cos": mean_cos(texts, texts, True),
        "text_image_cos": mean_cos(texts, images, False),
        "centroid_distance": float(np.linalg.norm(images.mean(0) - texts.mean(0))),
    }
