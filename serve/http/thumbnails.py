"""Thumbnails of catalogue rows for the search page: ``GET /images/{id}/thumbnail``.

Result URIs (``s3://...``, local paths on the serving nodes) are not something a browser can
open, so the app serves a small JPEG of each row itself. Only a row the catalogue holds is ever
read: the ingress looks the id up on its shard (``ShardSearcher.record``) and opens that row's
``uri`` through fsspec; nothing in the request names a path. The source is read with the app's
upload limits and decoded with ``embedding.decode_image`` (a decompression bomb in the catalogue
costs a header read), then shrunk to ``THUMBNAIL_SIZE`` pixels on its long side.

Thumbnails are kept in a per-replica LRU cache keyed by ``(id, uri)`` (a re-upload of an id
under another uri is a new entry) up to ``CACHE_BYTES``, and sent with an ``ETag`` (a hash of the
JPEG) and ``Cache-Control``, so a browser revalidates with ``If-None-Match`` and gets a 304.
A row whose source cannot be read or decoded (an ``upload:`` uri, a moved file) is a 404 JSON
``image_unavailable``; the page shows a placeholder.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import fsspec
from fastapi.responses import Response
from PIL import Image

from embedding.preprocess import ImageError, decode_image
from serve.http.errors import ApiError
from serve.http.limits import Limits

THUMBNAIL_SIZE = 256  # long side, pixels: a grid cell on a high-density screen
JPEG_QUALITY = 80
CACHE_BYTES = 64 * 1024 * 1024  # ~6,000 thumbnails of ~10 KB per ingress replica
CACHE_CONTROL = "public, max-age=3600"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes
    etag: str


class ThumbnailCache:
    """A byte-bounded LRU of thumbnails; thread-safe (thumbnails are made in worker threads)."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[str, str], Thumbnail] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Thumbnail | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, str], item: Thumbnail) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes -= len(old.jpeg) if old else 0
            self._items[key] = item
            self.bytes += len(item.jpeg)
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped.jpeg)

    def __len__(self) -> int:
        return len(self._items)


_cache: ThumbnailCache | None = None


def thumbnail_cache() -> ThumbnailCache:
    """This process's cache (one ingress replica per process)."""
    global _cache
    if _cache is None:
        _cache = ThumbnailCache()
    return _cache


def read_source(uri: str, max_bytes: int) -> bytes:
    """The bytes of a row's source image (at most ``max_bytes + 1``), through fsspec."""
    scheme = _SCHEME.match(uri)
    if scheme is None or scheme.group(1).lower() in ("file", "local"):
        path = uri[scheme.end() :] if scheme else uri
        if not path.startswith("/"):  # "upload:<id>" rows and relative paths have no file
            raise ApiError(404, "image_unavailable", f"the row's uri {uri!r} names no file")
        opener = lambda: open(path, "rb")  # noqa: E731
    else:
        opener = lambda: fsspec.open(uri, "rb")  # noqa: E731
    try:
        with opener() as f:
            return f.read(max_bytes + 1)
    except (OSError, ValueError, ImportError) as e:  # missing, denied, no fsspec backend
        raise ApiError(
            404, "image_unavailable", f"cannot read the row's image: {type(e).__name__}"
        ) from None


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


def _load(record: dict, limits: Limits, cache: ThumbnailCache) -> Thumbnail:
    key = (record["id"], record["uri"])
    item = cache.get(key)
    if item is None:
        item = make_thumbnail(read_source(record["uri"], limits.max_upload_bytes), limits)
        cache.put(key, item)
    return item


async def thumbnail_response(
    record: dict, if_none_match: str | None, limits: Limits, cache: ThumbnailCache | None = None
) -> Response:
    """The thumbnail of a catalogue ``record`` (``{"id", "uri", ...}``), or 304 when the
    client's ``If-None-Match`` names its ETag."""
    item = await asyncio.to_thread(_load, record, limits, cache or thumbnail_cache())
    headers = {"ETag": item.etag, "Cache-Control": CACHE_CONTROL}
    tags = {t.strip().removeprefix("W/") for t in (if_none_match or "").split(",")}
    if item.etag in tags or "*" in tags:
        return Response(status_code=304, headers=headers)
    return Response(item.jpeg, media_type="image/jpeg", headers=headers)
