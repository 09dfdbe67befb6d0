"""The store's manifest: which model made the vectors, how rows are sharded, what is live.

Object stores have no atomic rename, so every change is a new file ``_manifests/NNNNNN.json``
(written exclusively: two writers racing for the same number cannot both win) and readers take
the highest-numbered file that parses and says ``"complete": true``. ``manifest.json`` at the
root is a convenience copy for humans and tools; nothing trusts it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from index.store import Store

FORMAT_VERSION = 1
METRICS = ("ip", "l2")
KEEP_MANIFESTS = 50


class ManifestMismatch(ValueError):
    """New data would be mixed with vectors from another model, dimension or sharding."""


@dataclass
class ShardState:
    """What one shard serves: the live index version and the Parquet parts it was built from."""

    version: int | None = None
    parts: list[str] = field(default_factory=list)
    count: int = 0
    built_at: float | None = None


@dataclass
class Manifest:
    model: str
    weights: str
    dim: int
    num_shards: int
    metric: str = "ip"
    shards: dict[int, ShardState] = field(default_factory=dict)
    sequence: int = 0
    written_at: float = 0.0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.dim < 1 or self.num_shards < 1:
            raise ValueError(f"dim and num_shards must be >= 1, got {self.dim}, {self.num_shards}")
        for s in range(self.num_shards):
            self.shards.setdefault(s, ShardState())

    @property
    def model_tag(self) -> str:
        """``name@weights``: what query embeddings must match to be comparable."""
        return f"{self.model}@{self.weights}"

    def to_json(self) -> str:
        body = dataclasses.asdict(self)
        body["shards"] = {str(k): v for k, v in sorted(body["shards"].items())}
        body["format"] = FORMAT_VERSION
        body["complete"] = True  # last key: a truncated file never parses with it
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        body = json.loads(text)
        if not body.get("complete"):
            raise ValueError("manifest is incomplete")
        if body.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown manifest format {body.get('format')!r}")
        shards = {int(k): ShardState(**v) for k, v in body["shards"].items()}
        return cls(
            model=body["model"],
            weights=body["weights"],
            dim=body["dim"],
            num_shards=body["num_shards"],
            metric=body["metric"],
            shards=shards,
            sequence=body["sequence"],
            written_at=body["written_at"],
        )

    def check_compatible(self, model: str, weights: str, dim: int, num_shards: int) -> None:
        """Refuse to add vectors that cannot be compared with the ones already stored."""
        if (model, weights, dim) != (self.model, self.weights, self.dim):
            raise ManifestMismatch(
                f"store holds {self.model_tag} ({self.dim}-d) embeddings; refusing to add "
                f"{model}@{weights} ({dim}-d). Use a new store root for a new model."
            )
        if num_shards != self.num_shards:
            raise ManifestMismatch(
                f"store has {self.num_shards} shards; refusing to write with {num_shards}. "
                "Resharding means re-embedding into a new store root."
            )


def _manifest_name(sequence: int) -> str:
    return f"{sequence:06d}.json"


def load_manifest(store: Store) -> Manifest | None:
    """The newest complete manifest, or None for an empty store."""
    names = [n for n in store.ls(store.manifests_dir) if n.endswith(".json") and n[:-5].isdigit()]
    for name in sorted(names, reverse=True):
        try:
            return Manifest.from_json(
                store.read_bytes(posixpath.join(store.manifests_dir, name)).decode()
            )
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            continue  # a torn or foreign file: fall back to the one before it
    return None


def commit_manifest(
    store: Store,
    update: Callable[[Manifest | None], Manifest],
    retries: int = 20,
) -> Manifest:
    """Read the newest manifest, apply ``update`` to a copy and write it as the next sequence.

    Optimistic concurrency: if another writer took our sequence number first, re-read and re-apply.
    ``update`` must therefore be a pure function of the manifest it is given.
    """
    for _ in range(retries):
        current = load_manifest(store)
        proposed = update(copy.deepcopy(current))
        proposed.sequence = (current.sequence if current else 0) + 1
        proposed.written_at = time.time()
        text = proposed.to_json().encode()
        try:
            store.write_bytes(
                posixpath.join(store.manifests_dir, _manifest_name(proposed.sequence)),
                text,
                exclusive=True,
            )
        except FileExistsError:
            continue
        store.write_bytes(store.manifest_path, text)
        _prune(store, proposed.sequence)
        return proposed
    raise RuntimeError(f"could not commit the manifest of {store} after {retries} attempts")


def _prune(store: Store, newest: int) -> None:
    """Drop manifests far behind the newest; a reader holding an old one already parsed it."""
    for name in store.ls(store.manifests_dir):
        if (
            name.endswith(".json")
            and name[:-5].isdigit()
            and int(name[:-5]) <= newest - KEEP_MANIFESTS
        ):
            try:
                store.fs.rm(posixpath.join(store.manifests_dir, name))
            except FileNotFoundError:
                pass
