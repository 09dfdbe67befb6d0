"""Turn what the user named (folders, globs, list files, fsspec URIs) into input URIs.

The URI string is what a row's id is hashed from (``index.rows.sharding.uri_id``), so it must be the
same however the user spelled the input: local files become absolute paths (``./imgs``,
``/abs/imgs`` and ``file:///abs/imgs`` all give ``/abs/imgs/a.jpg``), remote ones keep their
scheme (``s3://bucket/key``). Listing happens once, on the driver; reading happens in Ray tasks.

A table file (``.csv``, ``.parquet``, ``.jsonl``/``.ndjson``) with a ``uri`` column is a list
file with columns: its ``uri`` column names the inputs (resolved like a list file's lines) and
its other columns are the rows' metadata (``pipelines.sidecar`` reads them).

``iter_inputs`` streams them (list files line by line, local folders directory by directory),
so the embedding job's driver never holds a catalogue's URIs at once; a remote folder or glob is
listed by fsspec in one piece (s3fs has no streaming listing). ``expand_inputs`` is the same as
one de-duplicated list, for small jobs and tools.
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
from collections.abc import Iterator

import fsspec

from pipelines.tables import iter_table_uris
from pipelines.uris import (
    InputError,
    canonical_uri,
    entry_uri,
    filesystem_of,
    is_local,
)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp"}
    | {".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
TABLE_EXTENSIONS = frozenset({".csv", ".parquet", ".pq", ".jsonl", ".ndjson"})


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_table_name(name: str) -> bool:
    """A table of inputs with metadata columns (CSV, Parquet, JSON lines)?"""
    return posixpath.splitext(name)[1].lower() in TABLE_EXTENSIONS


def expand_inputs(specs: list[str]) -> list[str]:
    """Every input URI, in order of the specs (each spec's matches sorted), without repeats.

    - a folder: every file below it (recursively) with an image extension;
    - a glob (``*``, ``?``, ``[``; ``**`` recurses): every matching file, any extension;
    - a list file (``.txt``, ``.lst``, ``.list``): one URI or path per line, taken as-is
      (blank lines and ``#`` comments skipped; relative paths are relative to the list file);
    - any other file: itself, whatever its extension (a bad one becomes an error row).
    """
    seen: set[str] = set()
    out: list[str] = []
    for spec in specs:
        for uri in _expand_one(spec):
            if uri not in seen:
                seen.add(uri)
                out.append(uri)
    return out


def iter_inputs(specs: list[str]) -> Iterator[str]:
    """Every input URI of ``specs``, streamed; a URI named twice comes twice (the job's
    per-shard planning drops repeats by id). A spec that names nothing raises InputError."""
    for spec in specs:
        yield from _iter_one(spec)


def _iter_one(spec: str) -> Iterator[str]:
    fs, path = filesystem_of(spec)
    if not _glob.has_magic(path) and is_local(spec) and os.path.isdir(path):
        for directory, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if is_image_name(name):
                    yield canonical_uri(os.path.join(directory, name))
        return
    if not _glob.has_magic(path) and fs.isfile(path):
        if posixpath.splitext(path)[1].lower() in LIST_EXTENSIONS:
            yield from _iter_list_file(fs, spec, path)
            return
        if is_table_name(path):
            yield from iter_table_uris(spec)
            return
    yield from _expand_one(spec)


def _to_uri(fs: fsspec.AbstractFileSystem, spec: str, path: str) -> str:
    if is_local(spec):
        return canonical_uri(path)
    return fs.unstrip_protocol(path)


def _expand_one(spec: str) -> list[str]:
    fs, path = filesystem_of(spec)
    if _glob.has_magic(path):
        found = fs.glob(path, detail=True)
        files = sorted(p for p, info in found.items() if info.get("type") != "directory")
        if not files:
            raise InputError(f"{spec}: the glob matches no file")
        return [_to_uri(fs, spec, p) for p in files]
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if is_image_name(p))
        return [_to_uri(fs, spec, p) for p in files]
    if fs.isfile(path):
        if posixpath.splitext(path)[1].lower() in LIST_EXTENSIONS:
            return _read_list_file(fs, spec, path)
        if is_table_name(path):
            return list(iter_table_uris(spec))
        return [_to_uri(fs, spec, path)]
    raise InputError(f"{spec}: no such file or folder")


def _read_list_file(fs: fsspec.AbstractFileSystem, spec: str, path: str) -> list[str]:
    return list(_iter_list_file(fs, spec, path))


def _iter_list_file(fs: fsspec.AbstractFileSystem, spec: str, path: str) -> Iterator[str]:
    base = posixpath.dirname(path)
    with fs.open(path, "rt", encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            yield entry_uri(fs, spec, base, line)
