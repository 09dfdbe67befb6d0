"""Publish a built version directory into the store, and make it live in the manifest.

Publishing gives the version a unique directory name (``index.storage.versions``): its number is
one past
the highest number seen (live or listed), and a random suffix keeps two builders of one shard
apart even when they pick the same number. Locally the directory is built under a hidden
``.tmp-*`` name and renamed into place (then the parent is fsynced); on an object store the files
are uploaded with ``meta.json`` last. Nothing is visible until the manifest names the directory:
a crash before the commit leaves an unreferenced directory that loading refuses or ignores and
that garbage collection removes (``index.storage.gc``).

``commit_results`` makes versions live with one manifest commit. A build records the live
version directory it started from, its *parent* (``meta["parent"]``, from the plan it read its
rows by), and its result becomes live only while the shard's live directory is still that
parent. Version numbers never decide: a build that started from V1 and finishes after a faster
build committed V2 (and GC then retired the parts and tombstones V2 folded in) would otherwise
name itself V3 and drop V2's rows and deletes for good. A refused result is *superseded*: its
builder discards it (``discard``) and plans again from the new live version
(``index.live.rebuild.rebuild_shard``). The check runs inside the optimistic manifest commit
(``index.storage.manifest.commit_manifest``), so two builds from one parent cannot both win.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from index.storage.manifest import Manifest, ShardState, commit_manifest
from index.storage.store import Store, fsync_dir
from index.storage.versions import META_FILE, version_number

STALE_TMP_SECONDS = 3600


class ShardBuildResult(NamedTuple):
    """What a build produced; ``commit_results`` turns it into the shard's manifest state."""

    shard: int
    version: int
    dir: str  # the version directory's name, vNNNNNN-xxxxxxxx
    count: int
    meta: dict


def list_versions(store: Store, shard: int) -> list[str]:
    """Version directory names of ``shard`` (live, old, or left by a crashed build), by number."""
    names = [n for n in store.ls(store.shard_index_dir(shard)) if version_number(n) is not None]
    return sorted(names, key=lambda n: (version_number(n), n))


def next_version(store: Store, shard: int, state: ShardState) -> int:
    """Never reuse a number below what exists: not the live one, nor one a crashed build left."""
    listed = [version_number(n) for n in list_versions(store, shard)]
    return max([state.version or 0, *listed]) + 1


def staging_dir(store: Store, shard: int) -> Path:
    """A fresh local directory to build into: beside its final place on a local store (so the
    publish is a rename), else in the system temp folder."""
    if store.is_local:
        parent = Path(store.shard_index_dir(shard))
        parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_tmp(parent)
        return Path(tempfile.mkdtemp(prefix=".tmp-v", dir=parent))
    return Path(tempfile.mkdtemp(prefix="vs-build-"))


def publish(store: Store, shard: int, local: Path, name: str) -> str:
    """Move or upload the built directory ``local`` to its unique name ``name``
    (``index.storage.versions.new_version_name``); returns the name."""
    target = store.index_version_dir(shard, name)
    if store.is_local:
        os.rename(local, target)  # a fresh unique name: no one else can hold it
        fsync_dir(os.path.dirname(target))
        return name
    try:
        files = sorted(f.name for f in Path(local).iterdir() if f.name != META_FILE)
        for file in (*files, META_FILE):  # meta.json last
            store.fs.put_file(os.path.join(local, file), posixpath.join(target, file))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return name


_NO_PARENT = object()


def parent_is_live(state: ShardState, result: ShardBuildResult) -> bool:
    """Whether ``result`` was built from the live version ``state`` names (a first build from
    none). A result that does not say its parent cannot show it is current: never."""
    parent = result.meta.get("parent", _NO_PARENT)
    return parent is not _NO_PARENT and parent == state.dir


def apply_results(manifest: Manifest, results: Sequence[ShardBuildResult]) -> Manifest:
    """Pure manifest update: make each result its shard's live version when the shard's live
    directory is still the one the build started from (``meta["parent"]``); any other result
    is superseded and left out (see the module docstring)."""
    now = time.time()
    for r in results:
        current = manifest.shards.get(r.shard) or ShardState()
        if not parent_is_live(current, r):
            continue
        manifest.shards[r.shard] = ShardState(
            version=r.version,
            dir=r.dir,
            count=r.count,
            built_at=r.meta.get("created_at"),
            live_since=now,
        )
    return manifest


class _NothingToCommit(Exception):
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest


def commit_results(store: Store, results: Sequence[ShardBuildResult | None]) -> Manifest:
    """Make built versions live with one manifest commit (optimistic, retried on races), and
    return the manifest as committed; a result whose parent is no longer live is left out
    (``committed`` tells). When every result is left out nothing is written and the newest
    manifest is returned."""
    results = [r for r in results if r is not None]

    def update(manifest: Manifest | None) -> Manifest:
        if manifest is None:
            raise ValueError(f"{store} has no manifest")
        shards = manifest.shards
        if not any(parent_is_live(shards.get(r.shard) or ShardState(), r) for r in results):
            raise _NothingToCommit(manifest)
        return apply_results(manifest, results)

    try:
        return commit_manifest(store, update)
    except _NothingToCommit as nothing:
        return nothing.manifest


def committed(manifest: Manifest, result: ShardBuildResult) -> bool:
    """Whether ``manifest`` (``commit_results``'s answer) made ``result`` live."""
    state = manifest.shards.get(result.shard)
    return state is not None and state.dir == result.dir


def discard(store: Store, result: ShardBuildResult) -> None:
    """Remove a superseded build: its version directory (published, never live, so no replica
    loads it) and the base parts it wrote (named after that directory, so no one else's)."""
    store.rm(store.index_version_dir(result.shard, result.dir), recursive=True)
    for part in result.meta.get("base_parts") or ():
        store.rm(store.path(part))


def _clean_stale_tmp(parent: Path) -> None:
    """Remove ``.tmp-*`` directories of builds that died long ago (never a running one's)."""
    now = time.time()
    for child in parent.iterdir():
        if child.name.startswith(".tmp-") and now - child.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(child, ignore_errors=True)
