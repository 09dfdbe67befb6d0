"""Where everything lives under one store root URI, and how files get there atomically.

The root is any fsspec URI (a local path, ``file://``, ``s3://``, ``gs://``...). Three rules make
one store safe for many processes on many machines, on a local disk and on an object store:

- **Listings are never cached.** s3fs and gcsfs keep a directory listing per filesystem instance
  and never expire it, so a process that listed ``_manifests/`` once would never see another
  process's commit. Remote filesystems are opened with ``use_listings_cache=False`` and every
  ``ls`` asks for a refresh; ``exists`` then asks the store too.
- **Whole files or nothing.** Local writes go to a temporary name, are fsynced and
  ``os.replace``-d into place, and the directory is fsynced after. On an object store a single PUT
  is atomic.
- **Create means create, or no commit.** ``create_bytes`` fails with ``FileExistsError`` when
  the object exists, atomically: ``os.link`` locally, a conditional PUT (``If-None-Match: *``,
  s3fs ``mode="create"``) on S3, and the same call on any fsspec backend that implements it.
  Accepting ``mode="create"`` is not proof (obstore's fsspec adapter accepts and ignores it, and
  fsspec's generic ``pipe_file`` checks, then writes), so the first ``create_bytes`` of a process
  on a store *probes* it (``probe_conditional_create``: a second create of one probe object
  under ``_probe/`` must be refused) and the answer is kept per (process, store). A backend that
  fails the probe makes ``create_bytes`` (and so every manifest commit) raise
  ``NonAtomicCreateError``: commits fail closed. Opting in to check-then-write, which two racing
  writers can both pass, is explicit (``$VISUAL_SEARCH_NONATOMIC_CREATE=1``, or the storage
  option ``"visual_search_nonatomic_create": true``, which travels with the ``Store`` to Ray
  tasks and replicas and is never handed to fsspec); such a store must then have one writer of
  manifests at a time, and that is logged once per process.

Filesystem options (endpoint, credentials, region) come the way fsspec users expect: the
``storage_options`` given to ``Store`` (the serve config's ``storage_options``, the jobs'
``--storage-options``), else the JSON in ``$VISUAL_SEARCH_STORAGE_OPTIONS``, plus whatever fsspec
and the SDK read themselves (``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL``, ``AWS_*`` keys).
A ``Store`` pickles as its URI and options, so Ray tasks and replicas open the same store.

Layout (see DESIGN.md)::

    <root>/manifest.json                      convenience copy of the newest manifest
    <root>/_manifests/NNNNNN.json             versioned manifests (the source of truth)
    <root>/_serving/shard=NNNNN/<replica>.json  which version each replica serves
                                                (index.storage.leases)
    <root>/embeddings/shard=NNNNN/part-*.parquet   rows not yet folded into a version (the delta)
    <root>/embeddings/shard=NNNNN/base-*.parquet   a version's compacted rows (its meta names them)
    <root>/errors/part-*.parquet              inputs that could not be embedded, with the reason
    <root>/indexes/shard=NNNNN/vNNNNNN-xxxxxxxx/  one immutable directory per built index version
    <root>/tombstones/shard=NNNNN/part-*.parquet  deletes (id, deleted_at), see index.live.parts
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.asyn import AsyncFileSystem
from fsspec.spec import AbstractFileSystem

from index.rows.sharding import shard_dir_name
from index.storage import cache

log = logging.getLogger(__name__)
PARALLEL_READS = 8  # files read at once (each a round trip on an object store)

ENV_STORAGE_OPTIONS = "VISUAL_SEARCH_STORAGE_OPTIONS"
PART_PREFIX = "part-"  # a delta part: rows (or tombstones) written since the live version
BASE_PREFIX = "base-"  # a version's compacted rows; only the version that names it reads it
_PARQUET_RE = re.compile(r"^(part|base)-[^/]+\.parquet$")
# opting in to non-atomic manifest commits (check-then-write): see the module docstring
ENV_NONATOMIC_CREATE = "VISUAL_SEARCH_NONATOMIC_CREATE"
OPTION_NONATOMIC_CREATE = "visual_search_nonatomic_create"  # a storage option fsspec never sees
PROBE_DIR = "_probe"
# per (store uri, options): None when conditional create works, else why not (probed once)
CREATE_PROBES: dict[tuple[str, str], str | None] = {}
_WARNED_NONATOMIC: set[tuple[str, str]] = set()


class NonAtomicCreateError(RuntimeError):
    """The store's backend cannot create an object only if it is absent, and nothing opted in
    to check-then-write: a manifest commit here could silently overwrite another's."""


def _one_request_options(fs) -> dict:
    """The ``cat_file`` options that read an object in one request: s3fs HEADs an object first
    to split a large read into concurrent ranges unless ``max_concurrency`` is 1."""
    try:
        parameters = inspect.signature(fs._cat_file).parameters
    except (AttributeError, TypeError, ValueError):  # not an async filesystem
        return {}
    return {"max_concurrency": 1} if "max_concurrency" in parameters else {}


class Store:
    """A store root: path arithmetic plus the few I/O primitives everything else is built on."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict | None = None) -> None:
        root = os.fspath(root)
        self.storage_options = dict(
            storage_options if storage_options is not None else _env_storage_options()
        )
        protocol = fsspec.core.split_protocol(root)[0] or "file"
        options = dict(self.storage_options)
        self.allow_nonatomic_create = _truthy(options.pop(OPTION_NONATOMIC_CREATE, False))
        if protocol not in ("file", "local"):
            options.setdefault("use_listings_cache", False)  # see the module docstring
        self.fs, path = fsspec.core.url_to_fs(root, **options)
        self.is_local = _is_local(self.fs)
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.uri = self.root if self.is_local else root.rstrip("/")
        self.protocol = protocol
        self._one_get = _one_request_options(self.fs)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __reduce__(self):
        return (Store, (self.uri, self.storage_options))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and (self.uri, self.storage_options) == (
            other.uri,
            other.storage_options,
        )

    def __hash__(self) -> int:
        return hash(self.uri)

    # ---- layout -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def full_uri(self, path: str) -> str:
        """``path`` (under the root) as a URI with its protocol: the key of local caches."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    @property
    def manifest_path(self) -> str:
        return self.path("manifest.json")

    @property
    def manifests_dir(self) -> str:
        return self.path("_manifests")

    @property
    def errors_dir(self) -> str:
        return self.path("errors")

    def embeddings_dir(self, shard: int) -> str:
        return self.path("embeddings", shard_dir_name(shard))

    def tombstones_dir(self, shard: int) -> str:
        return self.path("tombstones", shard_dir_name(shard))

    def serving_dir(self, shard: int) -> str:
        return self.path("_serving", shard_dir_name(shard))

    def shard_index_dir(self, shard: int) -> str:
        return self.path("indexes", shard_dir_name(shard))

    def index_version_dir(self, shard: int, name: str) -> str:
        """The directory of version ``name`` (``vNNNNNN-xxxxxxxx``, as the manifest names it)."""
        return posixpath.join(self.shard_index_dir(shard), name)

    def relative(self, path: str) -> str:
        """Path relative to the root, as stored in version metadata (a store can be moved)."""
        prefix = self.root.rstrip("/") + "/"
        return (
            path[len(prefix) :] if path.startswith(prefix) else posixpath.relpath(path, self.root)
        )

    # ---- primitives ---------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def ls(self, path: str) -> list[str]:
        """Names (not paths) directly under ``path``, fresh from the store; [] if it is absent."""
        try:
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def read_bytes(self, path: str) -> bytes:
        """The whole object in one GET (no HEAD first: it costs a round trip, and a small file
        replaced between the two would fail s3fs's ETag check)."""
        return self.fs.cat_file(path, **self._one_get)

    def read_json(self, path: str) -> dict:
        return json.loads(self.read_bytes(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` so that readers see the whole file or nothing (replacing any old one)."""
        if self.is_local:
            _write_local(path, data, exclusive=False)
        else:
            self.fs.pipe_file(path, data)

    def create_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` only if ``path`` does not exist yet, else raise ``FileExistsError``,
        atomically; ``NonAtomicCreateError`` on a backend that cannot, unless opted in (see the
        module docstring)."""
        if self.is_local:
            _write_local(path, data, exclusive=True)
            return
        problem = self.conditional_create_problem()
        if problem is None:
            self.fs.pipe_file(path, data, mode="create")  # FileExistsError when it exists
            return
        if not (self.allow_nonatomic_create or _truthy(os.environ.get(ENV_NONATOMIC_CREATE))):
            raise NonAtomicCreateError(
                f"{self.uri} cannot create objects atomically ({problem}), so manifest commits "
                f"are refused; with one committer at a time, set ${ENV_NONATOMIC_CREATE}=1 or "
                f"the storage option {OPTION_NONATOMIC_CREATE}=true to allow check-then-write"
            )
        key = self._probe_key()
        if key not in _WARNED_NONATOMIC:
            _WARNED_NONATOMIC.add(key)
            log.warning(
                "%s cannot create objects atomically (%s); opted in to check-then-write: run "
                "one committer of manifests at a time on this store",
                self.uri,
                problem,
            )
        if self.fs.exists(path):
            raise FileExistsError(path)
        self.fs.pipe_file(path, data)

    def conditional_create_problem(self) -> str | None:
        """None when this store's backend refuses a second create of one object, else why it
        does not; probed once per (process, store), a failed probe read is not remembered."""
        if self.is_local:
            return None
        key = self._probe_key()
        if key not in CREATE_PROBES:
            probe = self.path(PROBE_DIR, f"create-{uuid.uuid4().hex}")
            CREATE_PROBES[key] = probe_conditional_create(self.fs, probe)
        return CREATE_PROBES[key]

    def _probe_key(self) -> tuple[str, str]:
        return self.uri, json.dumps(self.storage_options, sort_keys=True, default=str)

    def rm(self, path: str, recursive: bool = False) -> None:
        """Delete ``path``; a path that is already gone is not an error."""
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def open_output(self, path: str):
        """A file to stream into (not atomic: for files private to one writer, like a job's
        staging files); its folder is created on a local store."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return self.fs.open(path, "wb")

    def write_parquet(self, table: pa.Table, path: str, **options) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", **options)
        self.write_bytes(path, buf.getvalue())

    def read_table(self, path: str, schema: pa.Schema | None = None) -> pa.Table:
        """One Parquet file whole: on an object store in one GET (``read_bytes``), not the
        HEADs and ranged GETs of a read through the filesystem (seven requests for a one-row
        part on s3fs; a replica starting on S3 reads thousands of them, each a round trip)."""
        if self.is_local:
            return pq.read_table(path, schema=schema)
        return pq.read_table(pa.BufferReader(self.read_bytes(path)), schema=schema)

    def read_parquet(self, paths: Iterable[str], columns: list[str] | None = None) -> pa.Table:
        """Parquet files as one table, ``PARALLEL_READS`` at a time: whole (``read_table``) or
        only ``columns`` (ranged reads: a large part's other columns are not fetched)."""

        def read(path: str) -> pa.Table:
            if columns is None:
                return self.read_table(path)
            return pq.read_table(path, columns=columns, filesystem=self.fs)

        paths = list(paths)
        if not paths:
            raise FileNotFoundError("no Parquet parts to read")
        with ThreadPoolExecutor(min(PARALLEL_READS, len(paths)), "read-parquet") as pool:
            tables = list(pool.map(read, paths))
        return pa.concat_tables(tables, promote_options="default")

    def parquet_rows(self, path: str) -> int:
        return pq.read_metadata(path, filesystem=self.fs).num_rows

    def new_part_name(self, key: str | None = None) -> str:
        """``part-<key>.parquet``; a deterministic key makes a retried write overwrite itself."""
        return f"{PART_PREFIX}{key or uuid.uuid4().hex}.parquet"

    # ---- listings (always fresh) --------------------------------------------------------------
    def list_parts(self, shard: int) -> list[str]:
        """Relative paths of a shard's delta parts (``part-*``), sorted; base parts and
        temporary files are left out."""
        return self._list_parquet(self.embeddings_dir(shard), PART_PREFIX)

    def list_base_parts(self, shard: int) -> list[str]:
        """Relative paths of every ``base-*`` part of a shard (live, old or orphaned)."""
        return self._list_parquet(self.embeddings_dir(shard), BASE_PREFIX)

    def list_tombstone_parts(self, shard: int) -> list[str]:
        """Relative paths of a shard's tombstone parts, sorted (temporary files skipped)."""
        return self._list_parquet(self.tombstones_dir(shard), PART_PREFIX)

    def list_error_parts(self) -> list[str]:
        return [self.path(p) for p in self._list_parquet(self.errors_dir, PART_PREFIX)]

    def _list_parquet(self, directory: str, prefix: str) -> list[str]:
        rel = self.relative(directory)
        return [
            f"{rel}/{name}"
            for name in self.ls(directory)
            if name.startswith(prefix) and _PARQUET_RE.match(name)
        ]

    # ---- local copies of remote version directories ------------------------------------------
    def local_dir(self, path: str) -> Path:
        """A local directory with the contents of ``path``: itself on a local store, else a copy
        in the node's cache (``index.storage.cache``), which index files are memory-mapped from."""
        if self.is_local:
            return Path(path)
        return cache.node_cache().fetch(self.fs, path, self.full_uri(path))

    def evict_local(self, path: str) -> None:
        """Drop the node-cache copy of ``path`` (a version that was collected or swapped out)."""
        if not self.is_local:
            cache.node_cache().evict(self.full_uri(path))


def probe_conditional_create(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """Create ``path`` twice with ``mode="create"``: None when the second is refused with
    ``FileExistsError``, else a sentence saying what the backend did. The object is removed."""
    if not isinstance(fs, AsyncFileSystem) and type(fs).pipe_file is AbstractFileSystem.pipe_file:
        return f"{type(fs).__name__} inherits fsspec's check-then-write pipe_file"
    try:
        fs.pipe_file(path, b"first", mode="create")
    except (TypeError, NotImplementedError, ValueError) as e:
        return f"pipe_file(mode='create') is not supported: {type(e).__name__}: {e}"
    try:
        fs.pipe_file(path, b"second", mode="create")
    except FileExistsError:
        return None
    except (TypeError, NotImplementedError, ValueError) as e:
        return f"a second pipe_file(mode='create') failed: {type(e).__name__}: {e}"
    finally:
        try:
            fs.rm(path)
        except OSError as e:  # the probe object is a few bytes: leave it rather than fail
            log.warning("could not remove the create probe %s: %s", path, e)
    return "a second pipe_file(mode='create') of one object replaced it"


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _env_storage_options() -> dict:
    raw = os.environ.get(ENV_STORAGE_OPTIONS, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"${ENV_STORAGE_OPTIONS} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"${ENV_STORAGE_OPTIONS} must be a JSON object")
    return value


def parse_storage_options(items: list[str] | str | dict | None) -> dict | None:
    """``key=value`` pairs (values read as JSON when they parse, e.g. ``anon=true``), a JSON
    object string, or a dict -> fsspec storage options; None when nothing was given."""
    if items is None or items == [] or items == "":
        return None
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, str):
        items = [items]
    out: dict = {}
    for item in items:
        item = item.strip()
        if item.startswith("{"):
            out.update(json.loads(item))
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"storage option {item!r} is not key=value")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _write_local(path: str, data: bytes, exclusive: bool) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails with FileExistsError, atomically
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)  # the rename/link itself survives a power loss too


def fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory (its entries); some filesystems cannot, and the rename stays atomic."""
    try:
        fsync_path(path)
    except OSError:
        pass


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
