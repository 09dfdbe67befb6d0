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
Kept free of FAISS so the garbage collector can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

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
    """Every data file present with the size meta.json records (and its SHA-256 if ``verify``)."""
    optional = [n for n in meta["files"] if n not in DATA_FILES]
    for name in (*DATA_FILES, *optional):
        expected = meta["files"].get(name)
        path = directory / name
        if expected is None or not path.exists():
            raise IndexLoadError(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise IndexLoadError(f"{path}: {size} bytes, meta.json says {expected['bytes']}")
        if verify and file_digest(path)["sha256"] != expected["sha256"]:
            raise IndexLoadError(f"{path}: checksum mismatch, the file is corrupt")


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
