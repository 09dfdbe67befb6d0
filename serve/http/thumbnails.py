"""Thumbnails of catalogue rows for the search page: ``GET /images/{id}/thumbnail``.

Result URIs (``s3://...``, local paths on the serving nodes) are not something a browser can
open, so the app serves a small JPEG of each row itself. Nothing in the request names a path:
the ingress looks the id up on its shard (``ShardSearcher.record``) and reads that row's ``uri``.

**A stored uri grants no access.** Anyone with the key (or anyone at all, with ``open_writes``)
can store any ``uri`` through ``POST /images``, and anyone may ask for the thumbnail, which the
server reads with its own credentials and network position. So a uri is read only when it lies
under the config's ``thumbnail_roots`` (``Sources``), checked on every read, not only when stored:

- local directories: ``file://`` URIs and absolute paths whose real path (symlinks resolved) is
  under a root's real path and outside ``/dev``, ``/proc``, ``/sys``, ``/run``; ``stat`` before
  ``open`` says it is a regular file (never a device, FIFO or socket, which could block a reader
  for good), and it is opened non-blocking, without following a link, and checked again;
- object-store prefixes (``s3://bucket/images/``): the uri must extend a root of its scheme with
  plain path segments (no ``..``, ``?``, ``#`` or ``::`` chains); read through fsspec with the
  process's credentials;
- nothing else: web schemes (``http://169.254.169.254/...``) are never read, whatever the roots.

``POST /images`` stores any uri (a row's uri is also its name, and in the ``uri`` id scheme its
id), and its answer says whether the uri lies under the roots (``thumbnail``); a uri outside them
is stored and never read. No roots (the default) means no thumbnails: the page shows placeholders.

Reads and decodes run in a small pool of their own (``READ_THREADS``), each waited for at most
``thumbnail_timeout_s``, so a slow source ties up neither the event loop nor the default executor
other routes use; at most ``max_upload_bytes`` are read. Images decode with an *anonymous*
caller's limits (the route is anonymous; ``embedding.decode_image``: a decompression bomb costs a
header read), then shrink to ``THUMBNAIL_SIZE`` pixels on the long side.

Thumbnails are kept in a per-replica LRU cache keyed by ``(id, uri)`` (a re-upload of an id
under another uri is a new entry) up to ``CACHE_BYTES``, and sent with an ``ETag`` (a hash of the
JPEG) and ``Cache-Control``, so a browser revalidates with ``If-None-Match`` and gets a 304.
A row whose source may not or cannot be read or decoded (an ``upload:`` uri, a uri outside the
roots, a moved file, a slow read) is a 404 JSON ``image_unavailable``; the page shows a
placeholder.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import unquote

import fsspec
from fastapi.responses import Response
from PIL import Image

from embedding.preprocess import ImageError, decode_image
from serve.config import OBJECT_STORE_SCHEMES, SYSTEM_DIRS, thumbnail_root
from serve.http.errors import ApiError
from serve.http.limits import Limits

THUMBNAIL_SIZE = 256  # long side, pixels: a grid cell on a high-density screen
JPEG_QUALITY = 80
CACHE_BYTES = 64 * 1024 * 1024  # ~6,000 thumbnails of ~10 KB per ingress replica
CACHE_CONTROL = "public, max-age=3600"
READ_THREADS = 4  # concurrent source reads + decodes per ingress replica (the rest queue)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes
    etag: str


T = TypeVar("T")


class ByteLru(Generic[T]):
    """A byte-bounded LRU keyed by a row's ``(id, uri)``; thread-safe (items are made in worker
    threads). ``size_of`` says what an item costs; the newest item stays even when over."""

    def __init__(self, max_bytes: int, size_of: Callable[[T], int]):
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.bytes = 0
        self._items: OrderedDict[tuple[str, str], T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> T | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, str], item: T) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes -= self.size_of(old) if old is not None else 0
            self._items[key] = item
            self.bytes += self.size_of(item)
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= self.size_of(dropped)

    def __len__(self) -> int:
        return len(self._items)


class ThumbnailCache(ByteLru[Thumbnail]):
    """Thumbnails by ``(id, uri)``, up to ``max_bytes`` of JPEG."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        super().__init__(max_bytes, lambda t: len(t.jpeg))


_cache: ThumbnailCache | None = None


def thumbnail_cache() -> ThumbnailCache:
    """This process's cache (one ingress replica per process)."""
    global _cache
    if _cache is None:
        _cache = ThumbnailCache()
    return _cache


class Sources:
    """Where thumbnails may be read from (``thumbnail_roots``), and the read itself."""

    def __init__(self, roots: list[str] | tuple[str, ...] = (), timeout_s: float = 10.0):
        roots = [thumbnail_root(root) for root in roots]  # normalised (ServeConfig.validate)
        # each local root as named and as its real path (a symlinked root still matches)
        self.local = [real for r in roots if r.startswith("/") for real in {r, os.path.realpath(r)}]
        self.remote = [r for r in roots if not r.startswith("/")]
        self.timeout_s = timeout_s

    def refusal(self, uri: str) -> str | None:
        """Why ``uri`` may not be read (lexically: nothing is touched), or None when it may."""
        kind, where = _parse(uri)
        if kind == "none":
            return where
        if kind == "local":
            if not any(_under(where, root) for root in self.local):
                return "the row's uri is not under thumbnail_roots"
            return None
        if not any(where.startswith(root) for root in self.remote):
            return "the row's uri is not under thumbnail_roots"
        return None

    def allows(self, uri: str) -> bool:
        return self.refusal(uri) is None

    def read(self, uri: str, max_bytes: int) -> bytes:
        """The bytes of a row's source (refused past ``max_bytes``); ApiError 404
        ``image_unavailable`` when it may not or cannot be read. Blocking: run it in the pool."""
        reason = self.refusal(uri)
        if reason is not None:
            raise ApiError(404, "image_unavailable", reason)
        kind, where = _parse(uri)
        try:
            data = self._local(where, max_bytes) if kind == "local" else _remote(where, max_bytes)
        except (OSError, ValueError, ImportError) as e:  # missing, denied, no fsspec backend
            raise ApiError(
                404, "image_unavailable", f"cannot read the row's image: {type(e).__name__}"
            ) from None
        if len(data) > max_bytes:
            raise ApiError(404, "image_unavailable", f"the row's image is over {max_bytes} bytes")
        return data

    def _local(self, path: str, max_bytes: int) -> bytes:
        real = os.path.realpath(path)  # a symlink out of the roots is outside them
        if _under_system(real) or not any(
            _under(real, os.path.realpath(root)) for root in self.local
        ):
            raise ApiError(404, "image_unavailable", "the row's file is not under thumbnail_roots")
        if not stat.S_ISREG(os.stat(real).st_mode):  # before open: a FIFO's open blocks
            raise ApiError(404, "image_unavailable", "the row's uri is not a regular file")
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(real, flags)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped since the stat
                raise ApiError(404, "image_unavailable", "the row's uri is not a regular file")
            return f.read(max_bytes + 1)


def _parse(uri: str) -> tuple[str, str]:
    """``("local", path)``, ``("remote", uri)`` or ``("none", why it names nothing to read)``."""
    match = _SCHEME.match(uri)
    if match is None:
        if uri.startswith("/"):
            return "local", uri
        return "none", "the row's uri names no file"  # "upload:<id>" rows, relative paths
    scheme = match.group(1).lower()
    rest = uri[match.end() :]
    if scheme == "file":
        if rest.lower().startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            return "none", "the row's file uri names another host"
        return "local", unquote(rest)
    if scheme not in OBJECT_STORE_SCHEMES:
        return "none", f"the server never reads {scheme}:// uris"
    segments = rest.split("/")
    if any(c in rest for c in ("?", "#", "::")) or any(p in ("", ".", "..") for p in segments):
        return "none", "the row's uri is not a plain object path"
    return "remote", f"{scheme}://{rest}"


def _under(path: str, root: str) -> bool:
    path = os.path.normpath(path)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _under_system(path: str) -> bool:
    return any(_under(path, d) for d in SYSTEM_DIRS)


def _remote(uri: str, max_bytes: int) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read(max_bytes + 1)


_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def named_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` threads called ``name`` (made on first use): slow
    sources and CPU-bound image work wait there, not in the default executor other routes use."""
    with _pools_lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=name)
        return _pools[name]


def read_pool() -> ThreadPoolExecutor:
    """This process's thumbnail threads."""
    return named_pool("thumbnail", READ_THREADS)


def make_thumbnail(data: bytes, limits: Limits, size: int = THUMBNAIL_SIZE) -> Thumbnail:
    """A JPEG of at most ``size`` px on its long side, upright, RGB."""
    try:
        img = decode_image(
            data, max_pixels=limits.max_pixels, max_bytes=limits.max_upload_bytes, draft_size=size
        )
    except ImageError as e:
        raise ApiError(404, "image_unavailable", f"the row's image: {e.reason}") from None
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    jpeg = out.getvalue()
    return Thumbnail(jpeg, '"' + hashlib.blake2b(jpeg, digest_size=12).hexdigest() + '"')


def _load(record: dict, sources: Sources, limits: Limits, cache: ThumbnailCache) -> Thumbnail:
    key = (record["id"], record["uri"])
    item = cache.get(key)
    if item is None:
        item = make_thumbnail(sources.read(record["uri"], limits.max_upload_bytes), limits)
        cache.put(key, item)
    return item


async def thumbnail_response(
    record: dict,
    if_none_match: str | None,
    sources: Sources,
    limits: Limits,
    cache: ThumbnailCache | None = None,
) -> Response:
    """The thumbnail of a catalogue ``record`` (``{"id", "uri", ...}``), or 304 when the
    client's ``If-None-Match`` names its ETag. ``limits``: an anonymous caller's."""
    if (reason := sources.refusal(record["uri"])) is not None:
        raise ApiError(404, "image_unavailable", reason)  # no thread, nothing touched
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(
        read_pool(), _load, record, sources, limits, cache or thumbnail_cache()
    )
    try:
        item = await asyncio.wait_for(work, sources.timeout_s)
    except TimeoutError:
        raise ApiError(
            404, "image_unavailable", f"reading the row's image took over {sources.timeout_s:g} s"
        ) from None
    headers = {"ETag": item.etag, "Cache-Control": CACHE_CONTROL}
    tags = {t.strip().removeprefix("W/") for t in (if_none_match or "").split(",")}
    if item.etag in tags or "*" in tags:
        return Response(status_code=304, headers=headers)
    return Response(item.jpeg, media_type="image/jpeg", headers=headers)
