"""The node's local cache of remote index version directories (for stores on object stores).

FAISS reads an index from a local file and numpy memory-maps a version's float16 vectors from
one, so a replica serving an ``s3://`` store copies each version directory it loads into this
cache first. Version directories are immutable, which makes a cached copy safe to reuse, with
three rules:

- **The key is the full URI** (protocol, bucket and path, hashed), so two stores, or ``s3://b/x``
  and ``gs://b/x``, never share an entry.
- **Evicted with its version.** A replica evicts the copy of a version it swapped away from, and
  garbage collection evicts the copies of versions it deletes (on its node).
- **Bounded, by what is in the folder.** After each fetch the least recently used copies (by
  the time a load last fetched or reused them) are removed until the folder's files add up to
  at most ``max_bytes`` (``$VISUAL_SEARCH_CACHE_BYTES``, e.g. ``100G``; default 32 GiB); the
  copy just fetched is always kept, even alone over the bound. A copy that fails its checksum
  on load is evicted and fetched again once (``index.ann.loading``).

What the bound does *not* know is which copies the replicas on the node are serving: eviction
(by the bound, or by a replica swapping away from a version another replica on the node still
serves) may remove a copy that is in use. That is safe, not free. A loaded version holds what it
reads from its copy in RAM except ``vectors.npy``, which it memory-maps; removing the folder
unlinks the file but the kernel keeps its blocks until the last mapping goes (the replica swaps
away or exits), so the replica keeps serving it and the disk is freed only then. So the disk the
cache really takes is at most ``max_bytes`` plus the ``vectors.npy`` of versions still mapped
after their copy was removed (at most those the node's replicas serve: two per shard during a
swap), and a replica that loads an evicted version again fetches it again.

Where: ``$VISUAL_SEARCH_CACHE`` (a fast local disk, e.g. the NVMe of cluster.yaml's memory
nodes), else the system temp folder, under ``visual-search-cache/``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import fsspec

from index.units import parse_bytes

ENV_CACHE_DIR = "VISUAL_SEARCH_CACHE"
ENV_CACHE_BYTES = "VISUAL_SEARCH_CACHE_BYTES"
DEFAULT_MAX_BYTES = 32 * 2**30
_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def cache_key(uri: str) -> str:
    """A folder name for ``uri``: a hash of the whole URI plus a readable tail."""
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:20]
    tail = _SAFE.sub("_", "_".join(uri.rstrip("/").split("/")[-2:]))[-60:]
    return f"{digest}-{tail}"


class LocalCache:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def path_of(self, uri: str) -> Path:
        return self.root / cache_key(uri)

    def fetch(self, fs: fsspec.AbstractFileSystem, remote: str, uri: str) -> Path:
        """The local copy of directory ``remote`` (``uri`` with its protocol), fetched if absent."""
        target = self.path_of(uri)
        if target.exists():
            _touch(target)
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        # Two replicas on one node may fetch the same version at once: each copies into its own
        # temporary folder and renames it into place; the loser discards its copy.
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.root))
        try:
            fs.get(remote.rstrip("/") + "/", str(staging), recursive=True)
            os.rename(staging, target)
        except OSError:
            if not target.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.enforce_bound(keep={target.name})
        return target

    def evict(self, uri: str) -> bool:
        """Remove the copy of ``uri``; True if there was one (mappings of its files stay valid)."""
        target = self.path_of(uri)
        if not target.exists():
            return False
        _remove_dir(target)
        return True

    def entries(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last use) of every cached copy."""
        if not self.root.exists():
            return []
        out = []
        for child in self.root.iterdir():
            if child.name.startswith(".") or not child.is_dir():
                continue
            size = sum(f.stat().st_size for f in child.iterdir() if f.is_file())
            out.append((child, size, child.stat().st_mtime))
        return out

    def enforce_bound(self, keep: set[str] = frozenset()) -> list[str]:
        """Remove least recently used copies, but those named in ``keep``, until the cache
        fits ``max_bytes`` (served or not: see the module docstring); returns their names."""
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        removed = []
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if path.name in keep:
                continue
            _remove_dir(path)
            total -= size
            removed.append(path.name)
        return removed


def _touch(path: Path) -> None:
    now = time.time()
    try:
        os.utime(path, (now, now))
    except OSError:
        pass


def _remove_dir(path: Path) -> None:
    """Rename out of the way first, so a concurrent fetch never sees a half-deleted copy.
    (Open memory maps of its files stay valid: the data lives until they are unmapped.)"""
    doomed = path.with_name(f".evict-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


_NODE_CACHE: LocalCache | None = None


def cache_root() -> Path:
    """The node cache's folder: ``$VISUAL_SEARCH_CACHE`` (else the temp folder) /
    ``visual-search-cache``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or tempfile.gettempdir()) / "visual-search-cache"


def node_cache() -> LocalCache:
    """This process's view of the node cache, configured from the environment."""
    global _NODE_CACHE
    root = cache_root()
    max_bytes = parse_bytes(os.environ.get(ENV_CACHE_BYTES) or DEFAULT_MAX_BYTES)
    if _NODE_CACHE is None or _NODE_CACHE.root != root or _NODE_CACHE.max_bytes != max_bytes:
        _NODE_CACHE = LocalCache(root, max_bytes)
    return _NODE_CACHE
