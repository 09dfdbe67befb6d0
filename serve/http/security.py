"""Who is calling, and whether that caller may write: safe defaults for a port anyone can reach.

An app's HTTP port may be reachable by anyone (a proxy on every node, ``0.0.0.0``), so:

- **Writes need the key.** ``POST /images``, ``DELETE /images/{id}`` and ``/admin/*`` need
  ``api_key`` (``Authorization: Bearer <key>`` or ``X-API-Key``). An app with no key refuses
  them (403 ``writes_need_api_key``, naming both ways out) unless its config says
  ``open_writes: true`` (anyone may write: a demo on 127.0.0.1). ``writes: false`` closes them.
- **Anonymous callers cost less** (``serve.http.limits``: lower caps on ``nprobe``,
  ``candidates`` and image pixels) and **see no server internals** (``serve.http.errors``:
  server-side error text is cut to its kind).

The key comparison is ``hmac.compare_digest`` (timing-safe). Reads stay open to anyone.
"""

from __future__ import annotations

import hmac
from typing import Any

from serve.config import ServeConfig
from serve.http.errors import ApiError


def presented_key(headers: Any) -> str:
    """The key a request carries (``X-API-Key``, else ``Authorization: Bearer``), or ""."""
    given = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given


def is_keyed(headers: Any, api_key: str) -> bool:
    """True when the request carries the app's key (never when the app has none)."""
    given = presented_key(headers)
    return bool(api_key and given) and hmac.compare_digest(given.encode(), api_key.encode())


def authorize_write(headers: Any, config: ServeConfig) -> None:
    """Refuse a write or admin call this caller may not make (403 / 401 JSON errors)."""
    if not config.writes:
        raise ApiError(403, "writes_disabled", "this app is read-only (writes: false)")
    if config.api_key:
        if not is_keyed(headers, config.api_key):
            raise ApiError(
                401, "unauthorized", "this endpoint needs Authorization: Bearer <key> or X-API-Key"
            )
        return
    if not config.open_writes:
        raise ApiError(
            403,
            "writes_need_api_key",
            "writes and /admin need an API key and this app has none: set api_key in the "
            "serve config (or VISUAL_SEARCH_API_KEY) and send Authorization: Bearer <key>, "
            "or set open_writes: true to let anyone who reaches the port write",
        )
