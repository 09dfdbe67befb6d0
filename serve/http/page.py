"""The search page for people: ``GET /`` and its assets under ``/static/``.

Plain HTML, CSS and JavaScript kept in ``serve/static/`` (no build step, no CDN, works offline).
The page talks to the same HTTP API as everyone else (``/search``, ``/stats``, ``/facets``,
``/images/{id}/thumbnail``). Its files are read once per replica and sent with an ETag; the page
is sent with a Content-Security-Policy that allows scripts, styles and connections only from the
app itself, a second line of defence behind the page's rule of putting catalogue text in as text.

Only the files named in ``ASSETS`` are served: ``/static/{name}`` is a lookup in that table,
never a path on disk. The ``<base href>`` of the page is the app's route prefix (the ASGI
``root_path``), so the page's relative requests reach the app wherever it is mounted.
"""

from __future__ import annotations

import functools
import hashlib
import html
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from serve.http.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"  # serve/static/ (package data)
ASSETS = {
    "filters.js": "text/javascript; charset=utf-8",  # the filter controls (from GET /facets)
    "search.js": "text/javascript; charset=utf-8",
    "search.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def _read(name: str) -> tuple[bytes, str]:
    data = (STATIC_DIR / name).read_bytes()
    return data, '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'


def _send(request: Request, data: bytes, etag: str, media_type: str) -> Response:
    headers = {**SECURITY_HEADERS, "ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


async def search_page(request: Request) -> Response:
    """The page, with ``<base href>`` set to where the app is mounted."""
    page, _ = _read("index.html")
    root = request.scope.get("root_path", "").rstrip("/")
    base = html.escape(f"{root}/", quote=True).encode()
    page = page.replace(b'<base href="/">', b'<base href="' + base + b'">', 1)
    etag = '"' + hashlib.blake2b(page, digest_size=12).hexdigest() + '"'
    return _send(request, page, etag, "text/html; charset=utf-8")


async def static_asset(request: Request, name: str) -> Response:
    """One of the page's own files (``ASSETS``); anything else is a 404 JSON ``not_found``."""
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    data, etag = _read(name)
    return _send(request, data, etag, ASSETS[name])


def add_page_routes(app: FastAPI) -> None:
    """Register ``GET /`` and ``GET /static/{name}`` on the ingress's FastAPI app."""
    app.add_api_route(
        "/", search_page, methods=["GET"], summary="The search page (HTML)", response_class=Response
    )
    app.add_api_route("/static/{name}", static_asset, methods=["GET"], include_in_schema=False)
