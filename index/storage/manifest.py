"""The store's manifest: which model made the vectors, how rows are sharded and named, what is live.

Object stores have no atomic rename, so every change is a new file ``_manifests/NNNNNN.json``
written with an atomic create (``Store.create_bytes``: ``os.link`` locally, a conditional PUT on
S3): of two writers racing for one number exactly one wins, and the loser re-reads and retries.
On a backend whose create is not conditional a commit raises ``NonAtomicCreateError`` (fails
closed) unless check-then-write was opted in (``index.storage.store``).
Readers take the highest-numbered file that parses and says ``"complete": true``; a writer
proposes one past the highest *name* listed, so a torn or foreign file never blocks commits.
``manifest.json`` at the root is a convenience copy for humans and tools; nothing trusts it.

The manifest is O(shards), whatever the number of rows or writes: model, dimension, metric, the id
scheme, the region grid (``index.rows.regions``), the layout and its router file, the learned
transform's file (``index.ann.transform``: set once by the first build, never changed), the
metadata schema (column -> type, at most ``index.rows.metadata.MAX_COLUMNS``; every writer merges
its columns in by ``index.rows.metadata.merge_schema`` or is refused), and per shard the live
version (its number and directory name), its row count and when it was built and made live. What a
version was built from (parts, applied tombstones) is in that version's own ``meta.json``
(``index.storage.publish``), read once per swap.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import posixpath
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from index.rows.metadata import MetadataError, check_schema, merge_schema
from index.rows.regions import check_levels
from index.storage.store import Store

FORMAT_VERSION = 2
METRICS = ("ip", "l2")
ID_SCHEMES = ("uri", "content")  # id = BLAKE2b of the source URI, or of the image bytes
LAYOUTS = ("hash", "routed")  # a row's shard: a hash of its id, or its vector's nearest cell
KEEP_MANIFESTS = 50


class ManifestMismatch(ValueError):
    """New data would be mixed with vectors from another model, dimension, sharding or ids."""


@dataclass
class ShardState:
    """What one shard serves: the live index version and its directory (``vNNNNNN-xxxxxxxx``)."""

    version: int | None = None
    dir: str | None = None
    count: int = 0
    built_at: float | None = None
    live_since: float | None = None  # when the commit made it live (garbage collection's clock)


@dataclass
class Manifest:
    model: str
    weights: str
    dim: int
    num_shards: int
    metric: str = "ip"
    id_scheme: str = "uri"
    shards: dict[int, ShardState] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # column -> type (index.rows.metadata)
    regions: int = 1  # grid levels of region rows per image (index.rows.regions); 1: none
    layout: str = "hash"  # LAYOUTS; "routed": rows placed by ``router`` (index.ann.routing)
    router: str | None = None  # the routed layout's router file, relative to the store root
    # the store's learned transform (index.ann.transform), relative to the root; None: vectors
    # are indexed as the model makes them. Set once, by the first build, never changed.
    transform: str | None = None
    sequence: int = 0
    written_at: float = 0.0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.id_scheme not in ID_SCHEMES:
            raise ValueError(f"id_scheme must be one of {ID_SCHEMES}, got {self.id_scheme!r}")
        if self.dim < 1 or self.num_shards < 1:
            raise ValueError(f"dim and num_shards must be >= 1, got {self.dim}, {self.num_shards}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if (self.layout == "routed") != (self.router is not None):
            raise ValueError("a routed store names its router file; a hashed store has none")
        self.metadata = check_schema(self.metadata)
        self.regions = check_levels(self.regions)
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
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        body = json.loads(text)
        if not isinstance(body, dict) or not body.get("complete"):
            raise ValueError("manifest is incomplete")
        if body.get("format") not in (1, FORMAT_VERSION):
            raise ValueError(f"unknown manifest format {body.get('format')!r}")
        shards = {int(k): _shard_state(v) for k, v in body["shards"].items()}
        return cls(
            model=body["model"],
            weights=body["weights"],
            dim=body["dim"],
            num_shards=body["num_shards"],
            metric=body["metric"],
            id_scheme=body.get("id_scheme", "uri"),
            shards=shards,
            metadata=body.get("metadata") or {},
            regions=body.get("regions", 1),
            layout=body.get("layout", "hash"),
            router=body.get("router"),
            transform=body.get("transform"),
            sequence=body["sequence"],
            written_at=body["written_at"],
        )

    def check_compatible(
        self,
        model: str,
        weights: str,
        dim: int,
        num_shards: int,
        id_scheme: str | None = None,
        regions: int | None = None,
    ) -> None:
        """Refuse to add vectors that cannot be compared with, or named like, the stored ones."""
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
        if id_scheme is not None and id_scheme != self.id_scheme:
            raise ManifestMismatch(
                f"store names rows by {self.id_scheme!r} ids; refusing to write {id_scheme!r} "
                f"ids ({'drop' if id_scheme == 'content' else 'add'} --dedup, or use a new store)"
            )
        if regions is not None and regions != self.regions:
            raise ManifestMismatch(
                f"store holds {self.regions} region grid level(s) per image; refusing to write "
                f"{regions} (--regions {self.regions}, or use a new store)"
            )

    def with_metadata(self, columns: dict[str, str]) -> Manifest:
        """This manifest with ``columns`` merged into its metadata schema (new ones added, the
        rest checked, ``index.rows.metadata.merge_schema``); a conflict is a ManifestMismatch."""
        try:
            self.metadata = merge_schema(self.metadata, columns)
        except MetadataError as e:
            raise ManifestMismatch(str(e)) from None
        return self


def evolve_metadata(store: Store, columns: dict[str, str]) -> Manifest:
    """Merge a writer's metadata ``columns`` into the store's schema before it writes rows with
    them (one commit when something is new; none when the schema already has them)."""
    current = load_manifest(store)
    if current is None:
        raise ValueError(f"{store} has no manifest")
    if copy.deepcopy(current).with_metadata(columns).metadata == current.metadata:
        return current  # nothing new (a conflict raised ManifestMismatch above)
    return commit_manifest(store, lambda m: m.with_metadata(columns))


def _shard_state(body: dict) -> ShardState:
    """A shard's state from format 2, or from format 1 (``parts`` listed, ``vNNNNNN`` dirs)."""
    version = body.get("version")
    name = body.get("dir") or (f"v{version:06d}" if version is not None else None)
    return ShardState(
        version=version,
        dir=name,
        count=body.get("count", 0),
        built_at=body.get("built_at"),
        live_since=body.get("live_since", body.get("built_at")),
    )


def _manifest_name(sequence: int) -> str:
    return f"{sequence:06d}.json"


def _sequences(store: Store) -> list[int]:
    names = store.ls(store.manifests_dir)
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def load_manifest(store: Store) -> Manifest | None:
    """The newest complete manifest, or None for an empty store."""
    manifest, _ = _load_newest(store)
    return manifest


def _load_newest(store: Store) -> tuple[Manifest | None, int]:
    """(newest complete manifest or None, highest sequence number listed)."""
    sequences = _sequences(store)
    for sequence in reversed(sequences):
        try:
            path = posixpath.join(store.manifests_dir, _manifest_name(sequence))
            return Manifest.from_json(store.read_bytes(path).decode()), sequences[-1]
        except (ValueError, KeyError, TypeError, FileNotFoundError, UnicodeDecodeError):
            continue  # a torn or foreign file: fall back to the one before it
    return None, sequences[-1] if sequences else 0


def commit_manifest(
    store: Store,
    update: Callable[[Manifest | None], Manifest],
    retries: int = 50,
) -> Manifest:
    """Read the newest manifest, apply ``update`` to a copy and create it as the next number.

    Optimistic concurrency: if another writer created that number first, re-read and re-apply
    (with a short random back-off). ``update`` must therefore be a pure function of the
    manifest it is given.
    """
    for attempt in range(retries):
        current, highest = _load_newest(store)
        proposed = update(copy.deepcopy(current))
        proposed.sequence = max(highest, current.sequence if current else 0) + 1
        proposed.written_at = time.time()
        text = proposed.to_json().encode()
        try:
            store.create_bytes(
                posixpath.join(store.manifests_dir, _manifest_name(proposed.sequence)), text
            )
        except FileExistsError:
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))  # back off, then retry
            continue
        store.write_bytes(store.manifest_path, text)
        _prune(store, proposed.sequence)
        return proposed
    raise RuntimeError(f"could not commit the manifest of {store} after {retries} attempts")


def _prune(store: Store, newest: int) -> None:
    """Drop manifests far behind the newest; a reader holding an old one already parsed it."""
    for sequence in _sequences(store):
        if sequence <= newest - KEEP_MANIFESTS:
            store.rm(posixpath.join(store.manifests_dir, _manifest_name(sequence)))
