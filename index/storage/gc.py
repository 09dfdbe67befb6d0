"""Garbage collection of one shard: old versions, the parts they needed, and dead leases.

What may go, decided by ``plan_gc`` (a pure function of what was listed) and done by
``collect_garbage``:

- **Old version directories**: every directory numbered at or below the live one, other than
  the live one and the *anchor* (the newest version that loads, by the one rule replicas use
  too, ``index.storage.versions.newest_loadable``: when the live version is corrupt, replicas
  serve the anchor), once no lease names it as served *or being loaded*
  (``index.storage.leases``: a replica leases a version before it fetches it) and ``grace_s``
  has passed since the live version became live (``ShardState.live_since``, and, in the
  serving app, since the collector itself first saw it, by its own clock): never on a timer
  alone, never while a replica serves or loads it. Doubt keeps: a lease is aged by the store's
  clock, not its writer's; one that went stale less than ``grace_s`` ago still keeps what it
  names (its replica's lease PUTs may just be failing); and a lease file that cannot be read
  stops the shard's collection (versions and parts) until it can, or until it is that old.
  Directories numbered above the live one (a build in progress, or one that never committed) are
  left alone. Each deleted version's ``base-*`` parts go with it, and its copy in this node's
  cache (``index.storage.cache``).
- **Retired inputs**: the ``part-*`` and tombstone parts the live version folded in (its meta's
  ``parts`` and ``tombstone_parts``), under the same two conditions and only while the live
  version is the anchor and every lease in force names it (or a newer version): a replica
  still serving, or loading, an older version reads those parts as its delta. The version
  holds what they held: their rows in its base parts, their tombstones in its
  ``tombstones.parquet`` (so a late-arriving older copy of a deleted row stays hidden, and a
  re-run of the embedding job does not bring a deleted image back). A version built before
  compaction existed reads its parts as its rows: nothing of it is retired. This
  is what keeps the control plane small: after a rebuild and its grace period a shard holds a
  few base parts and its live version.
- **Orphan base parts** of builds that never published, numbered at or below the live version.
- **Dead leases**: lease files long expired (replicas that died).

A version that could not be checked (the store did not answer) is not taken for a bad one: the
shard's plan then deletes nothing and says why it waits.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from index.storage.coverage import base_parts_of, live_meta
from index.storage.leases import LEASE_TTL_S, Leases, read_leases
from index.storage.manifest import ShardState, load_manifest
from index.storage.publish import list_versions
from index.storage.store import BASE_PREFIX, Store
from index.storage.versions import (
    LOAD_CHECKS,
    META_FILE,
    fallback_order,
    newest_loadable,
    version_number,
)

DEFAULT_GRACE_S = 60.0


@dataclass
class GcPlan:
    anchor: str | None = None
    versions: list[str] = field(default_factory=list)  # version dirs to delete
    parts: list[str] = field(default_factory=list)  # relative paths of part/base/tombstone files
    leases: list[str] = field(default_factory=list)  # dead lease files
    waiting: str | None = None  # why something is kept for now (grace, a lease)

    def summary(self) -> dict:
        return {
            "versions": list(self.versions),
            "parts": len(self.parts),
            "leases": len(self.leases),
            "waiting": self.waiting,
        }


def plan_gc(
    state: ShardState,
    versions: list[str],
    check: Callable[[str], object],
    leases: Leases,
    meta: dict | None,
    old_metas: dict[str, dict | None],
    base_parts: list[str],
    grace_s: float,
    now: float,
    seen_for_s: float | None = None,
) -> GcPlan:
    """What ``collect_garbage`` deletes (see the module docstring); touches nothing but
    ``check`` (a version name -> returns when it loads, IndexLoadError when refused).
    ``seen_for_s``: how long the collector itself has seen this live version (its own clock)."""
    plan = GcPlan(leases=list(leases.dead))
    if state.dir is None or state.version is None:
        return plan
    live_number = state.version
    at_or_below = [v for v in versions if (version_number(v) or 0) <= live_number]
    try:
        found = newest_loadable(fallback_order(state.dir, live_number, lambda: versions), check)
    except OSError as e:  # a failed read says nothing about the version: decide nothing now
        plan.waiting = f"could not check the versions: {type(e).__name__}: {e}"
        return plan
    plan.anchor = None if found is None else found[0]
    if plan.anchor is None:  # nothing loads: keep everything for whoever repairs it
        plan.waiting = "no version at or below the live one loads"
        return plan
    elapsed = now - (state.live_since or state.built_at or now)
    if seen_for_s is not None:  # never more than the collector has seen by its own clock
        elapsed = min(elapsed, seen_for_s)
    if elapsed < grace_s:
        plan.waiting = f"grace: {grace_s - elapsed:.0f}s left"
        return plan
    if leases.unknown:  # a replica we cannot read may serve or load any of them
        plan.waiting = f"unreadable leases: {sorted(leases.unknown)}"
        return plan
    keep = {state.dir, plan.anchor}
    for v in at_or_below:
        if v in keep:
            continue
        if v in leases.served:
            plan.waiting = f"{v} is still served or loading"
            continue
        plan.versions.append(v)
    live_bases = set(base_parts_of(meta))
    for v in plan.versions:
        old = old_metas.get(v) or {}
        plan.parts.extend(p for p in old.get("base_parts") or () if p not in live_bases)
    # orphans: base parts of versions that are gone (or never published) at or below the live one
    existing = set(versions) - set(plan.versions)
    for part in base_parts:
        name = posixpath.basename(part)[len(BASE_PREFIX) :].rsplit("-", 1)[0]
        number = version_number(name)
        if (
            part not in live_bases
            and name not in existing
            and number is not None
            and number <= live_number
            and part not in plan.parts
        ):
            plan.parts.append(part)
    older_served = {v for v in leases.served if (version_number(v) or 0) < live_number}
    compacted = meta is not None and "base_parts" in meta  # older versions read their parts
    if plan.anchor == state.dir and not older_served and compacted:
        plan.parts.extend(meta.get("parts") or ())
        plan.parts.extend(meta.get("tombstone_parts") or ())
    elif older_served:
        plan.waiting = f"older versions still served: {sorted(older_served)}"
    return plan


def collect_garbage(
    store: Store,
    shard: int,
    grace_s: float = DEFAULT_GRACE_S,
    *,
    now: float | None = None,
    lease_ttl_s: float = LEASE_TTL_S,
    seen_for_s: float | None = None,
) -> dict:
    """Plan and delete one shard's garbage; returns ``GcPlan.summary()`` of what went.

    ``grace_s`` is also how long a lease that went stale keeps what it names (leases are aged
    by the store's clock: ``index.storage.leases``); ``now`` shifts both clocks (tests).
    ``seen_for_s``: seconds since this collector first saw the live version, on its own
    monotonic clock (the serving app's Rebuilder passes it). The grace then runs from the later
    of the commit's ``live_since`` (the committer's wall clock) and that sighting, so a
    committer whose clock runs behind the collector's cannot shorten it."""
    manifest = load_manifest(store)
    if manifest is None:
        return GcPlan().summary()
    state = manifest.shards[shard]
    now = time.time() if now is None else now
    versions = list_versions(store, shard)
    leases = read_leases(store, shard, ttl_s=lease_ttl_s, now=now, keep_s=grace_s)
    meta = live_meta(store, shard, state)
    old_metas = {}
    for v in versions:
        if v != state.dir and (version_number(v) or 0) <= (state.version or 0):
            old_metas[v] = _read_meta(store, shard, v)
    plan = plan_gc(
        state,
        versions,
        lambda v: LOAD_CHECKS.check(store, shard, v),
        leases,
        meta,
        old_metas,
        store.list_base_parts(shard),
        grace_s,
        now,
        seen_for_s,
    )
    for path in plan.leases:
        store.rm(path)
    for v in plan.versions:
        directory = store.index_version_dir(shard, v)
        store.rm(directory, recursive=True)
        store.evict_local(directory)
    for part in plan.parts:
        store.rm(store.path(part))
    return plan.summary()


def _read_meta(store: Store, shard: int, name: str) -> dict | None:
    try:
        return store.read_json(posixpath.join(store.index_version_dir(shard, name), META_FILE))
    except (FileNotFoundError, ValueError):
        return None
