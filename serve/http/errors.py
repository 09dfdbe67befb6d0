"""The error model of the HTTP API: every refusal, its status, and what an anonymous caller sees.

Everything a client can get wrong is checked in the ingress, before any replica sees it: a
replica never receives bytes it could choke on. Every refusal is an ``ApiError`` and becomes a
JSON body ``{"error": "<reason_code>", "detail": "<human text>"}`` with the status below
(``add_error_handlers`` installs the conversions on the app; routing refusals and FastAPI's own
validation errors take the same shape).

======  =========================  ==========================================================
status  error                      when
======  =========================  ==========================================================
400     invalid_json               the body is not a JSON object
400     invalid_multipart          the multipart body cannot be parsed
400     missing_query              none of ``file`` / ``vector`` / ``id`` / ``text`` was given
400     ambiguous_query            more than one of them was given
404     unknown_id                 ``id`` names no row of the catalogue
501     image_queries_disabled     a file was sent to an app run with ``image_queries: false``
413     too_large                  the upload is over ``max_upload_bytes`` (checked while read)
413     decompression_bomb         the image header claims more than ``max_pixels`` pixels
415     not_an_image, unsupported  the file is not an image format we can decode
415     unsupported_media_type     the request is neither multipart/form-data nor JSON
422     empty, truncated           an empty file, or an image whose data ends early
422     wrong_vector_length        ``vector`` does not have the catalogue's dimension
422     non_finite_vector          ``vector`` holds NaN or +-Infinity
422     zero_vector                ``vector`` is all zeros (no direction to compare, metric ip)
422     invalid_vector             ``vector`` is not a flat list of numbers
422     invalid_text               ``text`` is not a string of 1..1000 characters
422     no_text_encoder            ``text`` sent to a store whose model has no text tower (or
                                   whose tokenizer cannot load here: the detail says why)
422     invalid_id                 ``id`` is not a non-empty string of at most 256 characters
                                   without ``/``
422     k_out_of_range             ``k`` is not in 1..1000 (1..``anon_max_k`` without the key)
422     nprobe_out_of_range        ``nprobe`` is not in 1..max_nprobe
422     candidates_out_of_range    ``candidates`` is not in 1..max_candidates
422     shards_probe_out_of_range  ``shards_probe`` is not in 1..the store's shards
422     shards_probe_unsupported   ``shards_probe`` below the shard count for a hash-sharded store
                                   (every query visits every shard there)
422     invalid_parameter          a parameter of the wrong type (``k=abc``, ``rerank=maybe``)
422     expand_m_out_of_range      ``expand_m`` is not in 1..100
422     expand_alpha_out_of_range  ``expand_alpha`` is not in 0..10
422     diversify_out_of_range     ``diversify`` (MMR lambda) is not in 0..1
422     dedup_out_of_range         ``dedup`` (near-duplicate threshold) is not a number > 0
503     embedder_unavailable       the query embedder did not answer in time
503     shard_unavailable          the shard owning ``id`` did not answer in time (a read by id;
                                   a write: nothing was written, retry)
503     no_shard_answered          no shard answered in time (some did: 200, ``partial: true``)
404     not_found                  no such path (any unknown URL)
405     method_not_allowed         a known path with another method (``GET /search``)
401     unauthorized               a write/admin call without the API key (``api_key`` is set)
403     writes_need_api_key        a write/admin call to an app with no key (``open_writes`` off)
403     writes_disabled            a write/admin call to an app run with ``writes: false``
403     cross_site_write           an open (keyless) write from another site's page, or from
                                   a browser that reached the app under a host name
400     missing_image              ``POST /images`` with neither ``file`` nor ``vector``
422     invalid_metadata           ``metadata`` is not a JSON object (or over 64 KiB), names a
                                   column the store does not have, or a value of the wrong type
422     invalid_uri                ``uri`` is not a string of at most 2048 characters
422     invalid_filter             ``filter`` is not in the filter form (``index.query.filters``)
422     filter_too_large           ``filter`` has more nodes than ``anon_max_filter_nodes``
                                   (without the key; 256 with it)
422     unknown_field              ``filter`` or ``fields`` names a column the store lacks
422     wrong_type                 a ``filter`` value or bound of the wrong type for its column
422     invalid_fields             ``fields`` is not a list (or comma-separated string) of names
404     image_unavailable          ``GET /images/{id}/thumbnail``: the row's uri is not under
                                   ``thumbnail_roots``, or its image cannot be read in time
======  =========================  ==========================================================

**Anonymous callers see no server internals** (``serve.http.security`` decides who is keyed).
Error reasons of server-side failures (an exception's text can hold file paths, hosts, pids) are
cut to their kind (``"timeout"``, ``"error: RayActorError"``, ``"IndexLoadError"``) in error
bodies, ``missing_shards``, ``/readyz`` and ``/stats`` (``redact``, ``public_error``); keyed
callers get the full text. Unexpected exceptions become a 500 with a request id to look up in the
log, never their text.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("ray.serve")


class ApiError(Exception):
    """A refusal with its HTTP status and machine-readable reason; becomes the JSON error body."""

    def __init__(self, status: int, error: str, detail: str, extra: dict | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail, **self.extra}


# ``embedding.ImageError`` reasons -> status
IMAGE_ERROR_STATUS = {
    "empty": 422,
    "truncated": 422,
    "too_large": 413,
    "decompression_bomb": 413,
    "not_an_image": 415,
    "unsupported": 415,
}
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}  # routing refusals


# ---- the error responses, as the OpenAPI document describes them ---------------------------------
class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable reason code")
    detail: str = Field(description="human-readable explanation")


def _responses(*pairs: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": text} for status, text in pairs}


ERROR_RESPONSES = _responses(
    (400, "malformed request: invalid_json, invalid_multipart, missing/ambiguous_query"),
    (404, "unknown_id"),
    (413, "too_large, decompression_bomb"),
    (415, "not_an_image, unsupported, unsupported_media_type"),
    (422, "bad vector, id, text, parameter, filter or fields; no_text_encoder (see the code)"),
    (501, "image_queries_disabled (an app of vectors only)"),
    (503, "embedder_unavailable, shard_unavailable, no_shard_answered"),
)
WRITE_ERROR_RESPONSES = _responses(
    (400, "invalid_json, invalid_multipart, missing_image, ambiguous_query"),
    (401, "unauthorized: the app has an api_key and the request did not carry it"),
    (
        403,
        "writes_need_api_key (the app has no key and open_writes is off), writes_disabled, "
        "cross_site_write (an open write from another site's page)",
    ),
    (413, "too_large, decompression_bomb"),
    (415, "not_an_image, unsupported, unsupported_media_type"),
    (422, "bad vector, id, uri, metadata or parameter (see the reason code)"),
    (501, "image_queries_disabled (send a vector)"),
    (
        503,
        "embedder_unavailable; shard_unavailable (the id's shard could not order the write: "
        "nothing was written, retry)",
    ),
)
RECORD_ERROR_RESPONSES = _responses(
    (
        404,
        "unknown_id; for a thumbnail also image_unavailable (not under thumbnail_roots, or "
        "unreadable)",
    ),
    (422, "invalid_id"),
    (503, "shard_unavailable"),
)
THUMBNAIL_RESPONSES = {
    200: {
        "description": "a JPEG of at most 256 px",
        "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
    },
    304: {"description": "If-None-Match names the current ETag: the caller's copy is current"},
    **RECORD_ERROR_RESPONSES,
}


# ---- what an anonymous caller sees --------------------------------------------------------------
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


def keyed(request: Request) -> bool:
    """Whether the ingress marked this request as carrying the API key (``serve.http.security``)."""
    return bool(getattr(request.state, "keyed", False))


def request_id(request: Request) -> str:
    """The client's ``x-request-id``, else the one Serve gave the request (in its logs)."""
    given = request.headers.get("x-request-id", "")
    if given:
        return given
    try:  # Ray is optional here: this module also runs in apps without Serve (tests, benchmarks)
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or ""
    except Exception:  # outside a Serve replica
        return ""


def allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app answers at the request's path (its ``Allow`` header on
    a 405, RFC 9110): Starlette's own 405 names only the methods of the first route whose path
    matched, and ``GET /images/{id}`` and ``DELETE /images/{id}`` are two routes."""
    methods: set[str] = set()
    for route in _flat_routes(getattr(request.app, "routes", ())):
        if route.matches(request.scope)[0] != Match.NONE:  # PARTIAL: the path, not the method
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _flat_routes(routes) -> list:
    """The routes of an app, with those of included routers (Serve's ``serve.ingress`` includes
    the class's routes as a router of their own, FastAPI keeps it nested) in their place."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)  # fastapi.routing._IncludedRouter
        out += _flat_routes(inner.routes) if inner is not None else [route]
    return out


# ---- the handlers ----------------------------------------------------------------------------
def add_error_handlers(app: FastAPI) -> None:
    """Every refusal and failure of ``app`` as the JSON error body, redacted for anonymous
    callers."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = exc.body() if keyed(request) else public_error(exc.body())
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # routing refusals (unknown path 404, wrong method 405) in the same JSON error shape
        error = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        detail = str(exc.detail)
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            if allowed:  # every method of the path, not only those of the route matched first
                headers["Allow"] = ", ".join(allowed)
                detail = f"{request.method} {request.url.path}: allowed {headers['Allow']}"
        return JSONResponse(
            {"error": error, "detail": detail}, status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in exc.errors()
        )
        return JSONResponse({"error": "invalid_parameter", "detail": problems}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # the text of an unexpected exception (paths, hosts) is for the log and keyed callers
        rid = request_id(request)
        log.error("unhandled %s (request %s)", type(exc).__name__, rid, exc_info=exc)
        detail = f"{type(exc).__name__}: {exc}" if keyed(request) else "internal error"
        if rid and not keyed(request):
            detail += f"; the server log has it under request id {rid}"
        return JSONResponse({"error": "internal", "detail": detail}, status_code=500)
