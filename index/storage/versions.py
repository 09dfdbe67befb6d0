"""What an index version directory is: its name, its files, and how it is checked.

A version of shard ``s`` lives in ``indexes/shard=SSSSS/vNNNNNN-xxxxxxxx/``: ``NNNNNN`` orders
versions (each build takes one past the highest it sees), ``xxxxxxxx`` is random, so two builders
of one shard never write into the same directory even when they pick the same number. The
manifest names the live directory; a directory nobody names is invisible. (Stores written before
the suffix have ``vNNNNNN`` directories; they are read the same way.)

Files: ``index.faiss`` (int64 row keys -> codes), ``rows.parquet`` (row key -> id, uri,
ingested_at, metadata), ``vectors.npy`` (float16, memory-mapped for rerank) and ``meta.json``
(written last: the spec, sizes, timings, what the version was built from, and the size and
SHA-256 of every other file); optionally ``tombstones.parquet`` (the deletes it applied, kept so
replicas keep hiding late-arriving copies of deleted rows after the tombstone parts are retired).
Kept free of FAISS (and of Ray) so the garbage collector can use it.

**The newest version that loads** is decided here, once, for the two places that need it: a
searcher replica that starts while its live version is refused serves the newest older one that
loads (``serve``'s shard holder), and garbage collection keeps exactly that version (its
*anchor*, ``index.storage.gc``). Both walk ``fallback_order`` with ``newest_loadable``, and both
refuse a version for the same reasons: ``meta.json`` unreadable or incomplete, a file missing, of
the wrong size or with the wrong SHA-256. The replica learns it by loading (``ShardIndex.load``
runs ``check_files``); GC, which must not load, by ``verify_version`` (on an object store it
streams each file through SHA-256, copying nothing into the node cache). ``LoadChecks`` keeps
GC's answers: a pass for good (a version directory never changes), a refusal for
``REFUSED_RETRY_S`` only, and a failed read (nothing learnt) not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from index.storage.digests import sha256_of
from index.storage.store import Store

INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
VECTORS_FILE = "vectors.npy"
META_FILE = "meta.json"
TOMBSTONES_FILE = "tombstones.parquet"  # the deletes a version applied (recent ones), optional
DATA_FILES = (ROWS_FILE, VECTORS_FILE, INDEX_FILE)
KEY = "key"
_NAME_RE = re.compile(r"^v(\d{6,})(?:-([0-9a-f]{8}))?$")


class IndexLoadError(RuntimeError):
    """A version directory is missing, incomplete or corrupt; it is refused, never half-used."""


def new_version_name(version: int) -> str:
    return f"v{version:06d}-{uuid.uuid4().hex[:8]}"


def version_number(name: str) -> int | None:
    """The number of a version directory name, or None if ``name`` is not one."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


def file_digest(path: str | os.PathLike[str]) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": os.path.getsize(path), "sha256": digest}


def read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise IndexLoadError(f"{path} is missing: not a complete index version") from e
    except (OSError, ValueError) as e:
        raise IndexLoadError(f"{path}: unreadable: {e}") from e
    check_meta(meta, str(path))
    return meta


def check_meta(meta: dict, where: str) -> None:
    missing = [k for k in ("count", "dim", "metric", "factory", "files") if k not in meta]
    if missing:
        raise IndexLoadError(f"{where} lacks {missing}")


def check_files(directory: Path, meta: dict, verify: bool) -> None:
    """Every data file present with the size meta.json records (and its SHA-256 if ``verify``:
    hashed once per unchanged file per node, ``index.storage.digests``)."""

    def size_of(name: str) -> int | None:
        path = directory / name
        return path.stat().st_size if path.exists() else None

    def digest_of(name: str) -> str:  # remembered per node for an unchanged file
        return sha256_of(directory / name)

    _check_files(str(directory), meta, size_of, digest_of if verify else None)


def _check_files(
    directory: str,
    meta: dict,
    size_of: Callable[[str], int | None],
    digest_of: Callable[[str], str] | None,
) -> None:
    """The files of ``meta`` against ``size_of`` (None: missing) and, unless None,
    ``digest_of`` (SHA-256 hex): the one list of what a loadable version holds."""
    optional = [n for n in meta["files"] if n not in DATA_FILES]
    for name in (*DATA_FILES, *optional):
        expected = meta["files"].get(name)
        path = f"{directory}/{name}"
        size = None if expected is None else size_of(name)
        if size is None:
            raise IndexLoadError(f"{path} is missing")
        if size != expected["bytes"]:
            raise IndexLoadError(f"{path}: {size} bytes, meta.json says {expected['bytes']}")
    if digest_of is None:
        return
    for name in (*DATA_FILES, *optional):
        if digest_of(name) != meta["files"][name]["sha256"]:
            raise IndexLoadError(f"{directory}/{name}: checksum mismatch, the file is corrupt")


def check_version_dir(directory: str | Path, verify: bool = True) -> dict:
    """What loading refuses, without loading: meta.json readable, every file present with its
    size (and SHA-256 when ``verify``). Returns the meta; raises IndexLoadError."""
    directory = Path(directory)
    meta = read_meta(directory)
    check_files(directory, meta, verify)
    return meta


def write_json(path: Path, body: dict) -> None:
    with open(path, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# ---- the newest version that loads: one rule for searcher replicas and garbage collection -----
T = TypeVar("T")
REFUSED_RETRY_S = 60.0  # a refused version is checked again after this long (it may be repaired)


def fallback_order(
    live: str, live_number: int, listed: Callable[[], Iterable[str]]
) -> Iterator[str]:
    """The versions a shard may be served from, in the order they are tried: the live one, then
    every version numbered below it, newest first (``listed`` is called only when the live one
    was refused). A version numbered like the live one (a twin build that lost the commit) or
    above it (a build in progress, or one that never committed) is never a fallback."""
    yield live
    numbered = [(version_number(n), n) for n in listed()]
    older = [(number, n) for number, n in numbered if number is not None and number < live_number]
    yield from (n for _, n in sorted(older, reverse=True))


def newest_loadable(
    order: Iterable[str],
    load: Callable[[str], T],
    refused: Callable[[str, IndexLoadError], None] | None = None,
) -> tuple[str, T] | None:
    """The first version of ``order`` that ``load`` accepts, with what ``load`` returned; None
    when every one is refused. ``load`` refuses a version by raising IndexLoadError (``refused``
    is told); any other exception (the store could not be read: nothing is known about the
    version) propagates, so no caller mistakes a failed read for a bad version."""
    for name in order:
        try:
            return name, load(name)
        except IndexLoadError as e:
            if refused is not None:
                refused(name, e)
    return None


def verify_version(store: Store, shard: int, name: str) -> dict:
    """What loading a version refuses, checked without loading it: ``meta.json`` readable and
    complete, every file present with its size and SHA-256. On an object store the stored
    objects are read as a stream (one listing for the sizes first; nothing is copied into the
    node cache). Returns the meta; IndexLoadError when refused, OSError when the store could not
    be read."""
    directory = store.index_version_dir(shard, name)
    if store.is_local:
        return check_version_dir(directory, verify=True)
    meta_path = posixpath.join(directory, META_FILE)
    try:
        meta = store.read_json(meta_path)
    except FileNotFoundError as e:
        raise IndexLoadError(f"{meta_path} is missing: not a complete index version") from e
    except ValueError as e:
        raise IndexLoadError(f"{meta_path}: unreadable: {e}") from e
    check_meta(meta, meta_path)
    sizes = {
        posixpath.basename(entry["name"]): entry.get("size")
        for entry in store.fs.ls(directory, detail=True, refresh=True)
    }

    def digest_of(file: str) -> str:
        with store.fs.open(posixpath.join(directory, file), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    _check_files(directory, meta, sizes.get, digest_of)
    return meta


class LoadChecks:
    """``verify_version`` answers, remembered per (store, shard, version): a pass for good (a
    version directory never changes once published), a refusal for ``retry_s`` (a version whose
    files were repaired, or read while incomplete, is looked at again), a failed read not at all
    (it says nothing about the version)."""

    MAX_PASSES = 4096  # forgotten all at once past this many (one entry per version built)

    def __init__(
        self,
        verify: Callable[[Store, int, str], dict] = verify_version,
        retry_s: float = REFUSED_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verify = verify
        self.retry_s = retry_s
        self.clock = clock
        self._passed: set[tuple[str, int, str]] = set()
        self._refused: dict[tuple[str, int, str], tuple[float, IndexLoadError]] = {}

    def check(self, store: Store, shard: int, name: str) -> None:
        """Return when the version loads; IndexLoadError when it is refused (now, or within
        ``retry_s`` of the last refusal); OSError when the store could not be read."""
        key = (store.uri, shard, name)
        if key in self._passed:
            return
        refused = self._refused.get(key)
        if refused is not None and self.clock() < refused[0] + self.retry_s:
            raise refused[1]
        try:
            self.verify(store, shard, name)
        except IndexLoadError as e:
            self._refused[key] = (self.clock(), e)
            raise
        self._refused.pop(key, None)
        if len(self._passed) >= self.MAX_PASSES:
            self._passed.clear()
        self._passed.add(key)

    def loads(self, store: Store, shard: int, name: str) -> bool:
        """Whether the version loads (``check`` as a bool; a failed read still raises)."""
        try:
            self.check(store, shard, name)
        except IndexLoadError:
            return False
        return True


LOAD_CHECKS = LoadChecks()  # this process's answers (the Rebuilder's GC asks every few seconds)
