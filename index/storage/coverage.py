"""Is this shard up to date, and what would a build of it read: the one rule, in one place.

A version's ``meta.json`` says what it covers (``index.live.rebuild`` writes these):

- ``base_parts``: the ``base-*`` parts holding its rows, compacted (one id once, deletes
  applied), written by the build itself;
- ``parts``: the ``part-*`` delta parts it folded in (retired by garbage collection once no
  replica serves an older version);
- ``tombstone_parts``: the tombstone parts it applied (retired the same way).

A shard is **up to date** when it has a live version and every listed ``part-*`` and tombstone
part is covered by it. The next build reads the live version's base parts (a version written
before compaction existed has none: its ``parts`` are its rows) plus the uncovered parts, and
applies every delete: the live version's (its ``tombstones.parquet``) and the tombstone parts it
did not apply. Parts are listed before tombstones, so a tombstone the build did
not see is newer than every row it read (``index.rows.visibility`` rule 2 then holds on replicas).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from index.storage.manifest import Manifest, ShardState, load_manifest
from index.storage.store import Store
from index.storage.versions import META_FILE


@dataclass
class ShardPlan:
    shard: int
    state: ShardState  # the manifest's view: live version number and directory
    meta: dict | None  # meta.json of the live version (None: no version yet)
    parts: list[str] = field(default_factory=list)  # every listed part-* (delta candidates)
    tombstone_parts: list[str] = field(default_factory=list)  # every listed tombstone part
    new_parts: list[str] = field(default_factory=list)  # parts the live version does not cover
    new_tombstones: list[str] = field(default_factory=list)  # tombstone parts it did not apply

    @property
    def up_to_date(self) -> bool:
        return self.meta is not None and not self.new_parts and not self.new_tombstones

    @property
    def source_parts(self) -> list[str]:
        """What a build reads: the live version's rows (base parts) plus the uncovered parts."""
        return [*base_parts_of(self.meta), *self.new_parts]


def covered_parts(meta: dict | None) -> set[str]:
    """Parts a version accounts for: its base parts and the delta parts it folded in."""
    meta = meta or {}
    return set(meta.get("base_parts") or ()) | set(meta.get("parts") or ())


def applied_tombstones(meta: dict | None) -> set[str]:
    return set((meta or {}).get("tombstone_parts") or ())


def base_parts_of(meta: dict | None) -> list[str]:
    """The parts holding a version's rows: ``base_parts``, or ``parts`` for older versions."""
    if not meta:
        return []
    if "base_parts" in meta:
        return list(meta["base_parts"])
    return list(meta.get("parts") or ())


def live_meta(store: Store, shard: int, state: ShardState) -> dict | None:
    """``meta.json`` of the live version named by ``state`` (None when the shard has none)."""
    if state.dir is None:
        return None
    return store.read_json(posixpath.join(store.index_version_dir(shard, state.dir), META_FILE))


def plan_shard(store: Store, shard: int, manifest: Manifest | None = None) -> ShardPlan:
    """List the shard (parts first, then tombstones) against its live version."""
    manifest = manifest or load_manifest(store)
    if manifest is None:
        raise ValueError(f"{store} has no manifest: embed some images first")
    if not 0 <= shard < manifest.num_shards:
        raise ValueError(f"shard {shard} out of range for {manifest.num_shards} shards")
    state = manifest.shards[shard]
    meta = live_meta(store, shard, state)
    parts = store.list_parts(shard)
    tombstones = store.list_tombstone_parts(shard)  # after the parts: see the module docstring
    covered, applied = covered_parts(meta), applied_tombstones(meta)
    return ShardPlan(
        shard=shard,
        state=state,
        meta=meta,
        parts=parts,
        tombstone_parts=tombstones,
        new_parts=[p for p in parts if p not in covered],
        new_tombstones=[t for t in tombstones if t not in applied],
    )
