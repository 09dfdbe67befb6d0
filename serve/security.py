"""Who is calling, and what that caller may do: safe defaults for a port anyone can reach.

An app's HTTP port may be reachable by anyone (a proxy on every node, ``0.0.0.0``), so:

- **Writes need the key.** ``POST /images``, ``DELETE /images/{id}`` and ``/admin/*`` need
  ``api_key`` (``Authorization: Bearer <key>`` or ``X-API-Key``). An app with no key refuses
  them (403 ``writes_need_api_key``, naming both ways out) unless its config says
  ``open_writes: true`` (anyone may write: a demo on 127.0.0.1). ``writes: false`` closes them.
- **Anonymous callers cost less.** A request without a valid key may ask ``nprobe``,
  ``candidates`` and image pixels only up to the ``anon_max_*`` caps; keyed ones up to ``max_*``.
  A refusal names the cap and that the key lifts it.
- **Anonymous callers see no server internals.** Error reasons of server-side failures (an
  exception's text can hold file paths, hosts, pids) are cut to their kind (``"timeout"``,
  ``"error: RayActorError"``, ``"IndexLoadError"``) in error bodies, ``missing_shards``,
  ``/readyz`` and ``/stats``; keyed callers get the full text. Unexpected exceptions become a
  500 with a request id to look up in the log, never their text.

The key comparison is ``hmac.compare_digest`` (timing-safe). Reads stay open to anyone.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

from serve.api import ApiError, Limits
from serve.config import ServeConfig

# fields whose value is the text of a server-side failure
ERROR_FIELDS = frozenset({"error", "reason", "reload_error", "lease_error", "embedder_error"})
# error codes whose ``detail`` describes a server-side failure, not the caller's input
SERVER_ERRORS = {
    "embedder_unavailable": "the query embedder did not answer in time",
    "shard_unavailable": "the shard owning the id did not answer in time",
    "no_shard_answered": "no shard answered in time",
    "internal": "internal error",
}
_KIND = re.compile(r"^(error: )?([A-Za-z_][\w.]*)")


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


def limits_for(config: ServeConfig, keyed: bool) -> Limits:
    """The request limits of a keyed or an anonymous caller."""
    limits = Limits(
        default_k=config.default_k,
        default_nprobe=config.default_nprobe,
        default_candidates=config.default_candidates,
        max_nprobe=config.max_nprobe,
        max_candidates=config.max_candidates,
        max_upload_bytes=config.max_upload_bytes,
        max_pixels=config.max_pixels,
    )
    if keyed:
        return limits
    lowered = (
        (config.anon_max_nprobe, config.max_nprobe),
        (config.anon_max_candidates, config.max_candidates),
        (config.anon_max_pixels, config.max_pixels),
    )
    limits.max_nprobe, limits.max_candidates, limits.max_pixels = (min(a, m) for a, m in lowered)
    if any(a < m for a, m in lowered):
        limits.hint = "the cap for callers without the API key; the key raises it"
    return limits


def error_kind(text: Any) -> Any:
    """``"error: RayActorError: The actor died ... /tmp/..."`` -> ``"error: RayActorError"``;
    ``"IndexLoadError: /store/..."`` -> ``"IndexLoadError"``; None and non-strings unchanged."""
    if not isinstance(text, str):
        return text
    match = _KIND.match(text.strip())
    return match.group(0) if match else "error"


def redact(body: Any) -> Any:
    """A copy of a JSON body with every server-side error text cut to its kind."""
    if isinstance(body, dict):
        return {
            key: error_kind(value)
            if key in ERROR_FIELDS and isinstance(value, str)
            else redact(value)
            for key, value in body.items()
        }
    if isinstance(body, list):
        return [redact(value) for value in body]
    return body


def public_error(body: dict[str, Any]) -> dict[str, Any]:
    """An ApiError body as an anonymous caller sees it: server-side details replaced."""
    if body.get("error") not in SERVER_ERRORS:
        return body  # about the caller's own request: the detail is what they need
    out = {**redact(body), "detail": SERVER_ERRORS[body["error"]]}
    return out
