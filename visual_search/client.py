"""A small HTTP client of a running app, for scripts and for ``visual-search search`` / ``stats``.

    from visual_search.client import SearchClient
    with SearchClient("http://127.0.0.1:8000") as client:
        hits = client.search("cat.jpg", k=5)["results"]        # an image file (or bytes)
        hits = client.search(id=hits[0]["id"])                  # a catalogue row
        hits = client.search(vector=[...])                      # a vector of the catalogue's dim
        hits = client.search("cat.jpg", expand=True, dedup=True, diversify=0.7)  # answer shaping
        client.stats(), client.record(row_id), client.thumbnail(row_id)

Answers are the app's JSON as dicts (the contract is in ``serve/http/``). A refusal raises
``SearchError`` with the HTTP status and the app's reason code (``unknown_id``, ``not_an_image``,
...); an app that cannot be reached raises it with ``status=None`` and ``error="unreachable"``.
The default URL is ``$VISUAL_SEARCH_URL`` or ``http://127.0.0.1:8000``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "VISUAL_SEARCH_URL"


class SearchError(Exception):
    """The app refused a request (``status`` 4xx/5xx) or could not be reached (``None``)."""

    def __init__(self, status: int | None, error: str, detail: str, body: dict | None = None):
        super().__init__(f"{status or 'no answer'} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.body = body or {}


def read_image(image: bytes | str | os.PathLike[str]) -> tuple[str, bytes]:
    """``(name, bytes)`` of a query image given as bytes, a local path or an fsspec URI."""
    if isinstance(image, bytes | bytearray):
        return "query", bytes(image)
    text = os.fspath(image)
    if "://" in text and not text.startswith("file://"):
        import fsspec

        with fsspec.open(text, "rb") as f:
            return text.rsplit("/", 1)[-1] or "query", f.read()
    path = Path(text.removeprefix("file://"))
    return path.name, path.read_bytes()


class SearchClient:
    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 60.0,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, headers=headers, transport=transport
        )

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any):
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise SearchError(None, "unreachable", f"{self.url}: {type(e).__name__}: {e}") from e
        if response.status_code in ok:
            return response
        try:
            body = response.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        raise SearchError(
            response.status_code,
            str(body.get("error", "http_error")),
            str(body.get("detail", response.text[:500])),
            body,
        )

    # ---- queries ------------------------------------------------------------------------------
    def search(
        self,
        image: bytes | str | os.PathLike[str] | None = None,
        *,
        id: str | None = None,
        vector: list[float] | Any | None = None,
        k: int | None = None,
        nprobe: int | None = None,
        rerank: bool | None = None,
        candidates: int | None = None,
        shards_probe: int | None = None,
        expand: bool | None = None,
        expand_m: int | None = None,
        expand_alpha: float | None = None,
        diversify: bool | float | None = None,
        dedup: bool | float | None = None,
        exclude_self: bool | None = None,
        min_score: float | None = None,
        text: str | None = None,
        text_weight: float | None = None,
        verify: bool | None = None,
        box: Sequence[float] | None = None,
    ) -> dict:
        """Top-k of exactly one of an image, a catalogue ``id`` or a ``vector``, or of a
        ``text`` (models with a text tower); ``text`` beside one of the others is a mixed query
        (``text_weight`` in 0..1, the app's default 0.5).

        ``shards_probe``: in a routed store, the shards visited (nearest the query first).
        Answer shaping (``index.query.shaping``; the app's defaults when None): ``expand`` (query
        expansion with the top ``expand_m`` results, weights ``score ** expand_alpha``),
        ``diversify`` (MMR: True or a lambda in 0..1), ``dedup`` (collapse near-duplicates: True
        or a similarity threshold; results get ``collapsed``), ``exclude_self``, ``min_score``.
        ``verify`` (image queries): results showing the same object first, by local features
        and RANSAC (results get ``inliers``, the answer ``verification``).
        ``box`` (image queries): search by that part of the image, ``(x0, y0, x1, y1)`` as
        fractions of its width and height (cut out here, sent as PNG; in a store embedded with
        ``--regions`` it finds the photos holding that part, results get ``region``).
        """
        if box is not None and image is None:
            raise ValueError("box: only with an image query")
        given = [
            name for name, v in (("image", image), ("id", id), ("vector", vector)) if v is not None
        ]
        if len(given) > 1 or not (given or text is not None):
            raise ValueError(
                f"give one of image, id, vector, and/or a text (got {given or 'none'})"
            )
        params = {
            key: value
            for key, value in (
                ("k", k),
                ("nprobe", nprobe),
                ("candidates", candidates),
                ("shards_probe", shards_probe),
                ("expand_m", expand_m),
                ("expand_alpha", expand_alpha),
                ("min_score", min_score),
            )
            if value is not None
        }
        for key, value in (
            ("rerank", rerank),
            ("expand", expand),
            ("diversify", diversify),
            ("dedup", dedup),
            ("exclude_self", exclude_self),
            ("verify", verify),
        ):
            if isinstance(value, bool):
                params[key] = "true" if value else "false"
            elif value is not None:
                params[key] = value
        mixed = {"text": text} if text is not None else {}
        if text_weight is not None:
            mixed["text_weight"] = text_weight
        if image is not None:
            name, data = read_image(image)
            if box is not None:
                name, data = f"{name} (box)", cut_box(data, box)
            files = {"file": (name, data, "application/octet-stream")}
            form = {k: str(v) for k, v in mixed.items()}
            return self._send("POST", "/search", params=params, files=files, data=form).json()
        body = dict(mixed)
        if id is not None:
            body["id"] = id
        elif vector is not None:
            body["vector"] = [float(x) for x in vector]
        return self._send("POST", "/search", params=params, json=body).json()

    def stats(self) -> dict:
        return self._send("GET", "/stats").json()

    def ready(self) -> dict:
        """``/readyz``'s body; ``ready`` says whether every shard is loaded (200 or 503)."""
        return self._send("GET", "/readyz", ok=(200, 503)).json()

    def record(self, row_id: str) -> dict:
        """``GET /images/{id}``: the row's id, uri and shard."""
        return self._send("GET", f"/images/{_quote(row_id)}").json()

    def thumbnail(self, row_id: str) -> bytes:
        """``GET /images/{id}/thumbnail``: a small JPEG."""
        return self._send("GET", f"/images/{_quote(row_id)}/thumbnail").content


def cut_box(data: bytes, box: Sequence[float]) -> bytes:
    """The part of an image inside ``box`` (fractions of its upright width and height,
    ``embedding.preprocess.crop_box``), as PNG bytes (lossless: the app decodes it as it would
    the photo)."""
    import io

    from PIL import Image, ImageOps

    from embedding.preprocess import check_box, crop_box

    check_box(box)  # before reading the image: a bad box is the caller's error, not the file's
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    out = io.BytesIO()
    crop_box(img, box).convert("RGB").save(out, "PNG")
    return out.getvalue()


def _quote(row_id: str) -> str:
    from urllib.parse import quote

    return quote(row_id, safe="")
