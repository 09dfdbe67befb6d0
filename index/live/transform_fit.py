"""Learn a store's transform once, before its first build (``index.ann.transform``).

A transform changes the space every shard indexes and scores in, so all shards must share one
and it can only be chosen while no shard has a version: ``ensure_transform`` runs on the build's
driver before any shard is built (``pipelines/build_index.py``), decides by the written rule
(``index.ann.transform.choose_transform``) from the rows the store holds, learns the transform on
a sample of them (up to ``SAMPLE_ROWS``, spread over the shards), saves it and commits it to the
manifest. The commit is a pure update: when another build committed a transform or a version
first, that one stands and this one's file is left for nothing (a few hundred KB, named by its
digest). No Ray here.
"""

from __future__ import annotations

import logging

import numpy as np

from index.ann.transform import (
    AUTO,
    NONE,
    TransformError,
    TransformSpec,
    check_asked,
    choose_transform,
    learn_transform,
    load_transform,
    save_transform,
)
from index.live.rebuild import source_rows
from index.rows import schema
from index.storage.coverage import plan_shard
from index.storage.manifest import Manifest, commit_manifest, load_manifest
from index.storage.store import Store

log = logging.getLogger(__name__)

SAMPLE_ROWS = 100_000  # rows a transform is learned on (a 1280-d covariance from 78x as many)


def _built(manifest: Manifest) -> bool:
    return any(state.dir is not None for state in manifest.shards.values())


def ensure_transform(store: Store, asked: str = AUTO, seed: int = 0) -> tuple[str | None, str]:
    """The store's transform file after this call (None: none) and why. Learns and commits one
    when the store has none, no shard is built yet and the rule says so; refuses (TransformError)
    an explicit ``pca:D``/``whiten:D`` the store cannot take (already built without it, or with
    another one)."""
    asked = check_asked(asked)
    manifest = load_manifest(store)
    if manifest is None:
        raise ValueError(f"{store} has no manifest: embed some images first")
    if manifest.transform is not None:
        current = load_transform(store, manifest)
        if asked not in (AUTO, NONE) and TransformSpec.parse(asked) != TransformSpec(
            current.out_dim, current.power
        ):
            raise TransformError(
                f"the store indexes in {current.describe()} since its first build; "
                f"{asked} would mix spaces (build a new store for another transform)"
            )
        return manifest.transform, f"kept: {current.describe()}"
    if _built(manifest):
        if asked not in (AUTO, NONE):
            raise TransformError(
                f"the store was first built without a transform; {asked} would mix spaces "
                "(build a new store to add one)"
            )
        return None, "none: the store was first built without one"
    plans = [plan_shard(store, s, manifest) for s in range(manifest.num_shards)]
    rows = sum(source_rows(store, plan) for plan in plans)
    spec, why = choose_transform(asked, manifest.model, manifest.dim, rows, manifest.layout)
    if spec is None:
        return None, why
    sample = _sample(store, plans, manifest.dim, SAMPLE_ROWS, seed)
    transform = learn_transform(sample, spec, manifest.metric)
    path = save_transform(store, transform)

    def update(current: Manifest | None) -> Manifest:
        if current is None:
            raise ValueError(f"{store} lost its manifest")
        if current.transform is None and not _built(current):
            current.transform = path
        return current

    committed = commit_manifest(store, update)
    if committed.transform != path:  # another build chose first: its choice stands
        return committed.transform, "kept: another build chose first"
    log.info("store transform: %s, learned on %d rows (%s)", transform.describe(), len(sample), why)
    return path, f"{why}; learned on {len(sample):,} rows"


def _sample(store: Store, plans: list, dim: int, limit: int, seed: int) -> np.ndarray:
    """Up to ``limit`` vectors, an even share from each shard, parts read in a seeded order."""
    rng = np.random.default_rng(seed)
    share = max(1, -(-limit // max(1, len(plans))))
    taken = []
    for plan in plans:
        parts = list(plan.source_parts)
        rng.shuffle(parts)
        got = 0
        for part in parts:
            table = store.read_parquet([store.path(part)], columns=[schema.EMBEDDING])
            vectors = schema.arrow_to_vectors(table[schema.EMBEDDING]).reshape(-1, dim)
            taken.append(vectors[: share - got])
            got += len(taken[-1])
            if got >= share:
                break
    return np.concatenate(taken) if taken else np.zeros((0, dim), np.float32)
