"""Where everything lives under one store root URI, and how files get there atomically.

The root is any fsspec URI (a local path, ``file://``, ``s3://``, ``gs://``...). Local writes go to
a temporary name and ``os.replace`` into place; object stores have no rename, but a single PUT is
atomic, so there we write the object directly. Readers only ever trust what the manifest names, so
a crashed writer leaves at most unreferenced garbage, never a half-visible version.

Layout (see DESIGN.md)::

    <root>/manifest.json                      convenience copy of the newest manifest
    <root>/_manifests/NNNNNN.json             versioned manifests (the source of truth)
    <root>/embeddings/shard=NNNNN/part-*.parquet
    <root>/errors/part-*.parquet              inputs that could not be embedded, with the reason
    <root>/indexes/shard=NNNNN/vNNNNNN/       one immutable directory per built index version
    <root>/tombstones/shard=NNNNN/part-*.parquet  deletes (id, deleted_at), see index.delta
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from index.sharding import shard_dir_name

_PART_RE = re.compile(r"part-[^/]+\.parquet$")


class Store:
    """A store root: path arithmetic plus the few I/O primitives everything else is built on."""

    def __init__(self, root: str | os.PathLike[str]):
        root = os.fspath(root)
        self.fs, path = fsspec.core.url_to_fs(root)
        self.is_local = _is_local(self.fs)
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.uri = self.root if self.is_local else root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # ---- layout -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

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

    def shard_index_dir(self, shard: int) -> str:
        return self.path("indexes", shard_dir_name(shard))

    def index_version_dir(self, shard: int, version: int) -> str:
        return posixpath.join(self.shard_index_dir(shard), f"v{version:06d}")

    def relative(self, path: str) -> str:
        """Path relative to the root, as stored in manifests (so a store can be moved or copied)."""
        return posixpath.relpath(path, self.root)

    # ---- primitives ---------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def makedirs(self, path: str) -> None:
        if self.is_local:
            os.makedirs(path, exist_ok=True)

    def ls(self, path: str) -> list[str]:
        """Names (not paths) directly under ``path``; empty if it does not exist."""
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read()

    def write_bytes(self, path: str, data: bytes, exclusive: bool = False) -> None:
        """Write ``data`` so that readers see the whole file or nothing.

        ``exclusive`` refuses to replace an existing file (FileExistsError): that is how two
        writers racing for the same manifest number are told apart on a local store.
        """
        if self.is_local:
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
        else:
            if exclusive and self.fs.exists(path):
                raise FileExistsError(path)
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def write_parquet(self, table: pa.Table, path: str) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(path, buf.getvalue())

    def read_parquet(self, paths: Iterable[str], columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(p, columns=columns, filesystem=self.fs) for p in paths]
        if not tables:
            raise FileNotFoundError("no Parquet parts to read")
        return pa.concat_tables(tables, promote_options="default")

    def new_part_name(self, key: str | None = None) -> str:
        """``part-<key>.parquet``; a deterministic key makes a retried write overwrite itself."""
        return f"part-{key or uuid.uuid4().hex}.parquet"

    def list_parts(self, shard: int) -> list[str]:
        """Relative paths of a shard's committed Parquet parts, sorted (temporary files skipped)."""
        directory = self.embeddings_dir(shard)
        return [
            self.relative(posixpath.join(directory, name))
            for name in self.ls(directory)
            if _PART_RE.search(name)
        ]

    def list_tombstone_parts(self, shard: int) -> list[str]:
        """Relative paths of a shard's tombstone parts, sorted (temporary files skipped)."""
        directory = self.tombstones_dir(shard)
        return [
            self.relative(posixpath.join(directory, name))
            for name in self.ls(directory)
            if _PART_RE.search(name)
        ]

    def list_error_parts(self) -> list[str]:
        return [
            posixpath.join(self.errors_dir, n)
            for n in self.ls(self.errors_dir)
            if _PART_RE.search(n)
        ]

    def local_dir(self, path: str, cache_dir: str | None = None) -> Path:
        """A local directory with the contents of ``path`` (itself on a local store, else a copy).

        Index files are memory-mapped, which needs a local file; immutable version directories
        make the cached copy safe to reuse.
        """
        if self.is_local:
            return Path(path)
        cache = Path(cache_dir or os.environ.get("VISUAL_SEARCH_CACHE", tempfile.gettempdir()))
        target = cache / "visual-search-cache" / path.strip("/").replace("/", "_")
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Two replicas on one node may fetch the same version at once: each copies into its own
        # temporary folder and renames it into place; the loser discards its copy.
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
        try:
            self.fs.get(path.rstrip("/") + "/", str(staging), recursive=True)
            os.rename(staging, target)
        except OSError:
            if not target.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
