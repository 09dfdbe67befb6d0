"""Who is calling, and whether that caller may write: safe defaults for a port anyone can reach.

An app's HTTP port may be reachable by anyone (a proxy on every node, ``0.0.0.0``), so:

- **Writes need the key.** ``POST /images``, ``DELETE /images/{id}`` and ``/admin/*`` need
  ``api_key`` (``Authorization: Bearer <key>`` or ``X-API-Key``). An app with no key refuses
  them (403 ``writes_need_api_key``, naming both ways out) unless its config says
  ``open_writes: true`` (anyone may write: a demo on 127.0.0.1). ``writes: false`` closes them.
- **Open writes are same-origin only.** A web page the user visits can send a multipart
  ``POST /images`` or ``POST /admin/rebuild?force=true`` to 127.0.0.1 without a CORS preflight,
  so with ``open_writes`` (and no key) a write from a browser must come from this app's own
  origin: ``Sec-Fetch-Site`` (when sent) must be ``same-origin`` or ``none``, ``Origin`` (when
  sent) must name the ``Host`` the request was sent to, and such a browser write must be sent to
  an IP address or ``localhost`` (a DNS-rebinding page reaches the port under its own name,
  which a same-origin check alone would pass). Refusals are 403 ``cross_site_write``. Clients
  that are not browsers send neither header and are unaffected; the search page writes nothing,
  ``/docs`` writes same-origin. Keyed writes need none of this (a page cannot read the key).
- **Anonymous callers cost less** (``serve.http.limits``: lower caps on ``nprobe``,
  ``candidates``, image pixels, ``k``, filter nodes and the shaping pool) and **see no server
  internals** (``serve.http.errors``: server-side error text is cut to its kind).
- **A stored uri grants no access**: thumbnails read only under ``thumbnail_roots``
  (``serve.http.thumbnails``).

The key comparison is ``hmac.compare_digest`` (timing-safe). Reads stay open to anyone.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any
from urllib.parse import urlsplit

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
    refuse_cross_site(headers)


def _host_port(netloc: str, default_port: str) -> tuple[str, str]:
    """``("127.0.0.1", "8000")`` of ``127.0.0.1:8000``; ``[::1]:80`` keeps its brackets."""
    netloc = netloc.strip().lower()
    host, sep, port = netloc.rpartition(":")
    if not sep or "]" in port:  # no port (an IPv6 literal's colons are inside its brackets)
        return netloc, default_port
    return host, port


def _ip_or_localhost(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def refuse_cross_site(headers: Any) -> None:
    """A write without a key (``open_writes``) from a browser must be same-origin, sent to an
    IP address or localhost: 403 ``cross_site_write`` otherwise (CSRF, DNS rebinding)."""
    site = headers.get("sec-fetch-site")
    origin = headers.get("origin")
    if site is None and origin is None:
        return  # not a browser (curl, the Python client): no page can be behind it
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        raise ApiError(
            403,
            "cross_site_write",
            f"a write from another site's page (Sec-Fetch-Site: {site}) is refused: this app "
            "has open writes and no key, so only its own pages and non-browser clients write",
        )
    host = headers.get("host", "")
    if origin is not None:
        parsed = urlsplit(origin.strip())
        default = "443" if parsed.scheme == "https" else "80"
        if parsed.scheme not in ("http", "https") or _host_port(
            parsed.netloc, default
        ) != _host_port(host, default):
            raise ApiError(
                403,
                "cross_site_write",
                f"a write from the page of another origin ({origin[:100]!r}, not this app's "
                f"{host[:100]!r}) is refused: open writes take same-origin writes only",
            )
    if not _ip_or_localhost(_host_port(host, "")[0]):
        raise ApiError(
            403,
            "cross_site_write",
            f"a browser write to {host[:100]!r} is refused: with open writes open the app at "
            "its IP address or localhost (a page under another name may be DNS rebinding)",
        )
