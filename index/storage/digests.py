"""A file's SHA-256, computed once per file per node, not on every load.

Every load of a version checks its files against the SHA-256s its ``meta.json`` records
(``index.storage.versions.check_files``): that is what catches a truncated download, a corrupt
cached copy or a bad disk. Hashing is the slow part of a replica's start: the float16 rerank
vectors of a 10M x 256-d store are 5 GB, about ten seconds of one core, paid again by every
replica that restarts on the node and by every garbage-collection pass that checks a version.

So the digest of a file is remembered on the node, under the node cache's folder
(``.digests/``), keyed by what ``stat`` says of the file: its path, device, inode, size, and
modification and change times (nanoseconds). A file written or replaced since has another key
and is hashed again. Two rules keep the memory honest:

- **No racy entries.** A file modified less than ``RACY_S`` before it was hashed is not
  remembered (git's "racily clean" rule): a filesystem's timestamps are coarser than a
  nanosecond, so a write in the same tick as the hash could leave the key unchanged.
- **Bounded.** Past ``MAX_ENTRIES`` the oldest half is dropped; a dropped entry costs one more
  hash, never a wrong answer.

What this does not catch is a file whose bytes change without its ``stat`` changing (bit rot
under an unchanged inode): the first load on the node checks it, later ones trust that check.
No Ray, no FAISS: garbage collection and the replicas both use it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from index.storage.cache import cache_root

FOLDER = ".digests"  # under the node cache's root (its dot keeps it out of the cache's entries)
RACY_S = 2.0  # a file modified this recently is hashed every time
MAX_ENTRIES = 20_000


def digests_root() -> Path:
    """Where this node remembers digests: in the node cache's folder (``$VISUAL_SEARCH_CACHE``)."""
    return cache_root() / FOLDER


def _key(path: Path, st: os.stat_result) -> str:
    said = "\0".join(
        str(v)
        for v in (
            os.path.realpath(path),
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
    )
    return hashlib.sha256(said.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def sha256_of(path: str | os.PathLike[str], root: Path | None = None) -> str:
    """The SHA-256 (hex) of the file at ``path``: remembered from an earlier hash on this node
    when the file is unchanged since, else read and hashed (and remembered unless racy)."""
    path = Path(path)
    root = digests_root() if root is None else root
    before = path.stat()
    memo = root / _key(path, before)
    try:
        known = memo.read_text().strip()
    except (OSError, UnicodeDecodeError):
        known = ""
    if len(known) == 64:
        return known
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    after = path.stat()
    settled = time.time() - after.st_mtime_ns / 1e9 > RACY_S
    if settled and _key(path, after) == memo.name:
        _remember(root, memo, digest)
    return digest


def _remember(root: Path, memo: Path, digest: str) -> None:
    """Write ``memo`` atomically (two replicas may hash the same file at once); a failure to
    write only means hashing again next time."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=root)
        with os.fdopen(fd, "w") as f:
            f.write(digest)
        os.replace(tmp, memo)
        _bound(root)
    except OSError:
        pass


def _bound(root: Path) -> None:
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda e: e.stat().st_mtime)
    for entry in entries[: len(entries) // 2]:
        try:
            os.unlink(entry.path)
        except OSError:
            pass
