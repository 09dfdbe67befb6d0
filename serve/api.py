"""The HTTP contract: request parsing and validation, response models, and the error model.

Everything a client can get wrong is checked here, in the ingress, before any replica sees it:
a replica never receives bytes it could choke on. Every refusal is a JSON body
``{"error": "<reason_code>", "detail": "<human text>"}`` with the status below.

======  =========================  ==========================================================
status  error                      when
======  =========================  ==========================================================
400     invalid_json               the body is not a JSON object
400     invalid_multipart          the multipart body cannot be parsed
400     missing_query              none of ``file`` / ``vector`` / ``id`` was given
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
422     invalid_id                 ``id`` is not a non-empty string of at most 256 characters
                                   without ``/``
422     k_out_of_range             ``k`` is not in 1..1000
422     nprobe_out_of_range        ``nprobe`` is not in 1..max_nprobe
422     candidates_out_of_range    ``candidates`` is not in 1..max_candidates
422     invalid_parameter          a parameter of the wrong type (``k=abc``, ``rerank=maybe``)
422     expand_m_out_of_range      ``expand_m`` is not in 1..100
422     expand_alpha_out_of_range  ``expand_alpha`` is not in 0..10
422     diversify_out_of_range     ``diversify`` (MMR lambda) is not in 0..1
422     dedup_out_of_range         ``dedup`` (near-duplicate threshold) is not a number > 0
503     embedder_unavailable       the query embedder did not answer in time
503     shard_unavailable          the shard owning ``id`` did not answer in time
503     no_shard_answered          no shard answered in time (some did: 200, ``partial: true``)
404     not_found                  no such path (any unknown URL)
405     method_not_allowed         a known path with another method (``GET /search``)
401     unauthorized               a write/admin call without the API key (``api_key`` is set)
403     writes_need_api_key        a write/admin call to an app with no key (``open_writes`` off)
403     writes_disabled            a write/admin call to an app run with ``writes: false``
400     missing_image              ``POST /images`` with neither ``file`` nor ``vector``
422     invalid_metadata           ``metadata`` is not a JSON object (or over 64 KiB), names a
                                   column the store does not have, or a value of the wrong type
422     invalid_uri                ``uri`` is not a string of at most 2048 characters
422     invalid_filter             ``filter`` is not in the filter form (``index.query.filters``)
422     unknown_field              ``filter`` or ``fields`` names a column the store lacks
422     wrong_type                 a ``filter`` value or bound of the wrong type for its column
422     invalid_fields             ``fields`` is not a list (or comma-separated string) of names
404     image_unavailable          ``GET /images/{id}/thumbnail``: the row's image cannot be read
======  =========================  ==========================================================

Writes (issue #5): ``POST /images`` takes a multipart ``file`` (or JSON ``vector`` for apps of
external embeddings) with optional ``id`` (default: the content hash of the bytes), ``uri`` and
``metadata`` (a JSON object of the store's typed columns); ``DELETE /images/{id}`` deletes;
both answer only after the row or tombstone is durable in the store. ``POST /admin/rebuild``
starts rebuilds. These need ``Authorization: Bearer <key>`` or ``X-API-Key``
(``serve.security``: an app with no key refuses them unless ``open_writes: true``). Callers
without the key get lower caps on ``nprobe``, ``candidates`` and image pixels, and no
server-side error text.

Parameters ``k``, ``nprobe``, ``rerank``, ``candidates`` come from the query string; a JSON body
or multipart form fields of the same names override them. So do the answer-shaping options
(``index.query.shaping``, all off by default): ``expand`` (true: average query expansion with the
top
``expand_m`` results weighted by ``score ** expand_alpha``), ``diversify`` (MMR; true or a
lambda in 0..1), ``dedup`` (collapse near-duplicates; true or a similarity threshold; each kept
result gets ``collapsed``, the ids it stands for), ``exclude_self`` and ``min_score``.

Metadata (issue #13): results carry ``metadata``, the row's columns named by ``fields`` (a JSON
list, or a comma-separated string in the query string or a form; default: every column of the
store's schema; ``[]`` or ``""``: none). ``filter`` (a JSON object in the body, or JSON text in a
multipart field) restricts the search to rows that match it, in the form of ``index.query.filters``:
``{"field": name, "eq"|"in"|"range"|"exists": ...}`` and ``{"and"|"or": [...]}``,
``{"not": ...}``. ``POST /images`` takes ``metadata`` as an object of the store's typed columns.
Both are checked against the store's metadata schema (the manifest's); the parse functions keep
the raw values (``raw_filter``, ``raw_fields``, ``raw_metadata``) and ``resolve_metadata`` /
``check_add_metadata`` check them, so the ingress can re-read a schema that grew and check again
without reading the body twice.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedding import ImageError, decode_image, prepare
from index.query import shaping
from index.query.filters import Filter, FilterError, parse_filter
from index.query.shaping import ShapeOptions
from index.rows.metadata import MetadataError, check_record, is_unicode
from serve.config import MAX_K

log = logging.getLogger("ray.serve")

MAX_JSON_BYTES = 4 * 1024 * 1024  # a 4096-d vector as JSON text is ~100 KB
FLOAT32_MAX = float(np.finfo(np.float32).max)
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, headers and small form fields around the file
MAX_ID_CHARS = 256

IMAGE_ERROR_STATUS = {
    "empty": 422,
    "truncated": 422,
    "too_large": 413,
    "decompression_bomb": 413,
    "not_an_image": 415,
    "unsupported": 415,
}


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


# ---- response models (also the OpenAPI schema) ---------------------------------------------------
class Result(BaseModel):
    id: str = Field(description="stable row id (hash of the source URI)")
    uri: str = Field(description="where the catalogue image came from")
    score: float = Field(description="inner product (cosine; higher is closer) or squared L2")
    shard: int
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="the row's metadata columns named by `fields` (default: all); null = absent",
    )
    collapsed: list[str] | None = Field(
        None, description="with dedup: ids of the near-duplicates this result stands for"
    )


class MissingShard(BaseModel):
    shard: int
    reason: str = Field(description="'timeout' or 'error: <type>'")


class SearchResponse(BaseModel):
    results: list[Result]
    took_ms: float
    shards_answered: int
    shards_total: int
    partial: bool = Field(description="true when some shard did not answer before the deadline")
    missing_shards: list[MissingShard] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable reason code")
    detail: str = Field(description="human-readable explanation")


class SearchBody(BaseModel):
    """The JSON form of a query: exactly one of ``vector`` or ``id``."""

    vector: list[float] | None = Field(None, description="query vector, length = catalogue dim")
    id: str | None = Field(None, description="id of a catalogue row: find its neighbours")
    k: int | None = Field(None, description=f"results to return, 1..{MAX_K} (default 10)")
    nprobe: int | None = Field(None, description="IVF lists probed per shard (index default)")
    rerank: bool | None = Field(None, description="exact rerank of candidates (default true)")
    candidates: int | None = Field(None, description="per-shard candidates before rerank")
    expand: bool | None = Field(
        None, description="average query expansion: search again with the query + top results"
    )
    expand_m: int | None = Field(
        None, description=f"results averaged into the query (default {shaping.EXPAND_M})"
    )
    expand_alpha: float | None = Field(
        None, description=f"weight score**alpha per result (default {shaping.EXPAND_ALPHA:g})"
    )
    diversify: bool | float | None = Field(
        None,
        description="MMR diversification: true, or lambda in 0..1 "
        f"(1 = plain ranking; true = {shaping.DIVERSIFY_LAMBDA:g})",
    )
    dedup: bool | float | None = Field(
        None,
        description="collapse near-duplicates: true, or a similarity threshold "
        f"(true = {shaping.DEDUP_THRESHOLD:g})",
    )
    exclude_self: bool | None = Field(
        None, description="leave the query itself out (id queries; identical catalogue images)"
    )
    min_score: float | None = Field(None, description="leave out results scoring worse than this")
    filter: dict[str, Any] | None = Field(None, description="metadata filter (the filter form)")
    fields: list[str] | None = Field(None, description="metadata columns returned (default all)")


class AddResponse(BaseModel):
    id: str
    uri: str
    shard: int
    part: str = Field(description="the Parquet part holding the row (relative to the store)")
    ingested_at_ms: int
    searchable: bool = Field(description="false: durable, but the shard did not answer in time")
    metadata: dict[str, Any] = Field(default_factory=dict, description="the row's metadata")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "malformed request: invalid_json, invalid_multipart, missing/ambiguous_query"),
        (404, "unknown_id"),
        (413, "too_large, decompression_bomb"),
        (415, "not_an_image, unsupported, unsupported_media_type"),
        (422, "bad vector, id, parameter, filter or fields (see the reason code)"),
        (501, "image_queries_disabled (an app of vectors only)"),
        (503, "embedder_unavailable, shard_unavailable, no_shard_answered"),
    )
}

WRITE_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "invalid_json, invalid_multipart, missing_image, ambiguous_query"),
        (401, "unauthorized: the app has an api_key and the request did not carry it"),
        (403, "writes_need_api_key (the app has no key and open_writes is off), writes_disabled"),
        (413, "too_large, decompression_bomb"),
        (415, "not_an_image, unsupported, unsupported_media_type"),
        (422, "bad vector, id, uri, metadata or parameter (see the reason code)"),
        (501, "image_queries_disabled (send a vector)"),
        (503, "embedder_unavailable"),
    )
}

# Serve's ingress hides the body from FastAPI's signature parsing (we read it ourselves, with a
# size limit), so the two accepted bodies are described to OpenAPI here.
SEARCH_OPENAPI_EXTRA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
                        "nprobe": {"type": "integer", "minimum": 1},
                        "rerank": {"type": "boolean"},
                        "candidates": {"type": "integer", "minimum": 1},
                        "expand": {"type": "boolean"},
                        "expand_m": {"type": "integer", "minimum": 1},
                        "expand_alpha": {"type": "number", "minimum": 0},
                        "diversify": {"type": ["boolean", "number"]},
                        "dedup": {"type": ["boolean", "number"]},
                        "exclude_self": {"type": "boolean"},
                        "min_score": {"type": "number"},
                    },
                }
            },
            "application/json": {"schema": SearchBody.model_json_schema()},
        },
    }
}


# ---- parsed request -----------------------------------------------------------------------------
@dataclass
class SearchParams:
    k: int
    nprobe: int | None
    rerank: bool
    candidates: int | None
    filter: Filter | None = None  # checked against the store's schema (resolve_metadata)
    fields: tuple[str, ...] | None = None  # None: every column of the schema
    shape: ShapeOptions = field(default_factory=ShapeOptions)


_UNSET = object()  # a raw ``filter``/``fields`` that was not given


@dataclass
class ParsedQuery:
    kind: str  # "image", "vector" or "id"
    params: SearchParams
    image: bytes | None = None
    vector: np.ndarray | None = None
    row_id: str | None = None
    raw_filter: Any = None  # the request's ``filter`` as given (JSON value or text)
    raw_fields: Any = _UNSET  # the request's ``fields`` as given


@dataclass
class Limits:
    default_k: int = 10
    default_nprobe: int | None = None
    default_candidates: int | None = None
    max_nprobe: int = 65536
    max_candidates: int = 10000
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    hint: str = ""  # appended to a refusal by these caps (anonymous callers: the key lifts them)


def _over(limits: Limits, text: str) -> str:
    return f"{text} ({limits.hint})" if limits.hint else text


def _int_param(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(422, "invalid_parameter", f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ApiError(422, "invalid_parameter", f"{name} must be an integer, got {value!r}")


def _bool_param(name: str, value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ApiError(422, "invalid_parameter", f"{name} must be true or false, got {value!r}")


def validate_params(raw: dict[str, Any], limits: Limits) -> SearchParams:
    """k, nprobe, rerank, candidates from strings or JSON values, range-checked."""
    k = _int_param("k", raw.get("k"))
    k = limits.default_k if k is None else k
    if not 1 <= k <= MAX_K:
        raise ApiError(422, "k_out_of_range", f"k must be in 1..{MAX_K}, got {k}")
    nprobe = _int_param("nprobe", raw.get("nprobe"))
    if nprobe is not None and not 1 <= nprobe <= limits.max_nprobe:
        raise ApiError(
            422,
            "nprobe_out_of_range",
            _over(limits, f"nprobe must be in 1..{limits.max_nprobe}, got {nprobe}"),
        )
    candidates = _int_param("candidates", raw.get("candidates"))
    if candidates is not None and not 1 <= candidates <= limits.max_candidates:
        raise ApiError(
            422,
            "candidates_out_of_range",
            _over(limits, f"candidates must be in 1..{limits.max_candidates}, got {candidates}"),
        )
    rerank = _bool_param("rerank", raw.get("rerank"))
    return SearchParams(
        k,
        limits.default_nprobe if nprobe is None else nprobe,
        True if rerank is None else rerank,
        limits.default_candidates if candidates is None else candidates,
        shape=validate_shape(raw),
    )


def _float_param(name: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(422, "invalid_parameter", f"{name} must be a number, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ApiError(
            422, "invalid_parameter", f"{name} must be a number, got {value!r}"
        ) from None
    if not math.isfinite(number):
        raise ApiError(422, "invalid_parameter", f"{name} must be finite, got {value!r}")
    return number


def _switch_or_number(name: str, value: Any, default: float) -> float | None:
    """``true`` -> ``default``, ``false``/absent -> None (off), a number -> that number."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return default if value else None
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "false", "no"):
        return default if value.strip().lower() in ("true", "yes", "on") else None
    return _float_param(name, value)


def validate_shape(raw: dict[str, Any]) -> ShapeOptions:
    """The answer-shaping options (``index.query.shaping``), range-checked; all off when absent."""
    expand_m = _int_param("expand_m", raw.get("expand_m"))
    if expand_m is not None and not 1 <= expand_m <= shaping.MAX_EXPAND_M:
        raise ApiError(
            422,
            "expand_m_out_of_range",
            f"expand_m must be in 1..{shaping.MAX_EXPAND_M}, got {expand_m}",
        )
    alpha = _float_param("expand_alpha", raw.get("expand_alpha"))
    if alpha is not None and not 0 <= alpha <= shaping.MAX_EXPAND_ALPHA:
        raise ApiError(
            422,
            "expand_alpha_out_of_range",
            f"expand_alpha must be in 0..{shaping.MAX_EXPAND_ALPHA:g}, got {alpha}",
        )
    diversify = _switch_or_number("diversify", raw.get("diversify"), shaping.DIVERSIFY_LAMBDA)
    if diversify is not None and not 0 <= diversify <= 1:
        raise ApiError(
            422,
            "diversify_out_of_range",
            f"diversify (MMR lambda) must be in 0..1, got {diversify}",
        )
    dedup = _switch_or_number("dedup", raw.get("dedup"), shaping.DEDUP_THRESHOLD)
    if dedup is not None and dedup <= 0:
        raise ApiError(
            422, "dedup_out_of_range", f"dedup (a similarity threshold) must be > 0, got {dedup}"
        )
    return ShapeOptions(
        expand=bool(_bool_param("expand", raw.get("expand"))),
        expand_m=shaping.EXPAND_M if expand_m is None else expand_m,
        expand_alpha=shaping.EXPAND_ALPHA if alpha is None else alpha,
        diversify=diversify,
        dedup=dedup,
        exclude_self=bool(_bool_param("exclude_self", raw.get("exclude_self"))),
        min_score=_float_param("min_score", raw.get("min_score")),
    )


def validate_vector(value: Any, dim: int, normalise: bool) -> np.ndarray:
    """A JSON list -> (dim,) float32; unit length when the metric is inner product (cosine)."""
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise ApiError(422, "invalid_vector", "vector must be a flat JSON list of numbers")
    if len(value) != dim:
        raise ApiError(
            422,
            "wrong_vector_length",
            f"vector has {len(value)} values; this catalogue's embeddings have {dim}",
        )
    # Python's json reads NaN/Infinity (and 1e999 -> inf); float32 overflow is non-finite too
    if not all(math.isfinite(v) for v in value):
        raise ApiError(422, "non_finite_vector", "vector holds NaN or Infinity")
    exact = np.asarray(value, dtype=np.float64)
    if np.abs(exact).max(initial=0.0) > FLOAT32_MAX:
        raise ApiError(422, "non_finite_vector", "vector values overflow float32")
    if normalise:
        # the norm and the division in float64: a direction of tiny values (1e-300, which is 0
        # in float32) is still a direction, and huge ones do not overflow when squared
        scale = np.abs(exact).max(initial=0.0)
        if scale == 0.0:
            raise ApiError(422, "zero_vector", "vector is all zeros: it has no direction")
        exact = exact / scale
        exact = exact / np.linalg.norm(exact)
    return exact.astype(np.float32)


def validate_id(value: Any) -> str:
    """A row id: 1..256 characters, no ``/`` (``/images/{id}`` routes could never name it)."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS or "/" in value:
        raise ApiError(
            422,
            "invalid_id",
            f"id must be a non-empty string of at most {MAX_ID_CHARS} chars, without '/'",
        )
    if not is_unicode(value):
        raise ApiError(422, "invalid_id", "id is not valid Unicode (a lone surrogate)")
    return value


def image_crop(data: bytes, image_size: int, limits: Limits) -> np.ndarray:
    """Uploaded bytes -> the model's uint8 centre crop, exactly as the batch job prepares it
    (``pipelines.embed_stages.read_decode_batch``: JPEG draft decode at the resize size, then
    ``prepare``), so a catalogue image uploaded as a query gets the catalogue's own vector."""
    resize_size = round(image_size * 256 / 224)  # prepare()'s default short side
    try:
        img = decode_image(
            data,
            max_pixels=limits.max_pixels,
            max_bytes=limits.max_upload_bytes,
            draft_size=resize_size,
        )
        return prepare(img, image_size, resize_size)
    except ImageError as e:
        detail = _over(limits, e.detail) if e.reason == "decompression_bomb" else e.detail
        raise ApiError(IMAGE_ERROR_STATUS[e.reason], e.reason, detail) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` (never buffered whole)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body of {declared} bytes > limit {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"request body passed the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_multipart(request: Request, body: bytes) -> dict[str, Any]:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=2, max_fields=20)
    except Exception as e:  # python-multipart / starlette parse errors have no common base
        raise ApiError(400, "invalid_multipart", f"cannot parse multipart body: {e}") from None
    fields: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if key in fields:
                raise ApiError(400, "invalid_multipart", f"field {key!r} given more than once")
            fields[key] = await value.read() if isinstance(value, UploadFile) else value
    finally:
        await form.close()
    return fields


async def parse_search(request: Request, limits: Limits, dim: int, normalise: bool) -> ParsedQuery:
    """One of: multipart ``file``, JSON ``vector``, JSON ``id`` (or ``?id=``), validated; the
    ``filter`` and ``fields`` as given (``resolve_metadata`` checks them against the schema)."""
    extras: dict[str, Any] = {"filter": None, "fields": request.query_params.get("fields", _UNSET)}
    query = await _parse_search(request, limits, dim, normalise, extras)
    query.raw_filter, query.raw_fields = extras["filter"], extras["fields"]
    return query


async def _parse_search(
    request: Request, limits: Limits, dim: int, normalise: bool, extras: dict[str, Any]
) -> ParsedQuery:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw: dict[str, Any] = {key: request.query_params.get(key) for key in _PARAM_KEYS}
    query_id = request.query_params.get("id")
    if content_type == "multipart/form-data":
        body = await read_body(request, limits.max_upload_bytes + MULTIPART_OVERHEAD)
        fields = await _parse_multipart(request, body)
        raw.update({k: v for k, v in fields.items() if k in _PARAM_KEYS})
        extras.update({k: _text_field(v) for k, v in fields.items() if k in extras})
        image = fields.get("file")
        if isinstance(image, str):
            image = image.encode()
        if image is not None and query_id is not None:
            raise ApiError(400, "ambiguous_query", "give a file or an id, not both")
        if image is None:
            if query_id is None:
                raise ApiError(400, "missing_query", "multipart body has no 'file' field")
            return ParsedQuery("id", validate_params(raw, limits), row_id=validate_id(query_id))
        if len(image) > limits.max_upload_bytes:
            raise ApiError(
                413, "too_large", f"file of {len(image)} bytes > limit {limits.max_upload_bytes}"
            )
        return ParsedQuery("image", validate_params(raw, limits), image=image)
    if content_type in ("application/json", "") or content_type.endswith("+json"):
        body = await read_body(request, MAX_JSON_BYTES)
        if not body.strip():
            if query_id is None:
                raise ApiError(
                    400, "missing_query", "send a multipart 'file', or JSON 'vector' or 'id'"
                )
            return ParsedQuery("id", validate_params(raw, limits), row_id=validate_id(query_id))
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # [[[[... nests past
            raise ApiError(400, "invalid_json", f"body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "body must be a JSON object")
        unknown = sorted(set(data) - {"vector", "id", *_PARAM_KEYS, *extras})
        if unknown:
            raise ApiError(422, "invalid_parameter", f"unknown fields: {', '.join(unknown)}")
        raw.update({k: data[k] for k in _PARAM_KEYS if k in data})
        extras.update({k: data[k] for k in extras if k in data})
        row_id = data.get("id", query_id)
        candidates = (("vector", data.get("vector")), ("id", row_id))
        given = [name for name, value in candidates if value is not None]
        if not given:
            raise ApiError(400, "missing_query", "send a multipart 'file', or JSON 'vector'/'id'")
        if len(given) > 1:
            raise ApiError(400, "ambiguous_query", "give a vector or an id, not both")
        params = validate_params(raw, limits)
        if given == ["id"]:
            return ParsedQuery("id", params, row_id=validate_id(row_id))
        return ParsedQuery("vector", params, vector=validate_vector(data["vector"], dim, normalise))
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {content_type!r}: send multipart/form-data (file) or application/json",
    )


_PARAM_KEYS = (
    "k",
    "nprobe",
    "rerank",
    "candidates",
    *("expand", "expand_m", "expand_alpha", "diversify", "dedup", "exclude_self", "min_score"),
)
MAX_FILTER_TEXT = 64 * 1024


def resolve_metadata(query: ParsedQuery, schema: dict[str, str]) -> ParsedQuery:
    """Check the query's raw ``filter`` and ``fields`` against the store's metadata ``schema``
    and set ``query.params.filter`` / ``.fields``; ApiError 422 names the problem."""
    query.params.filter = validate_filter(query.raw_filter, schema)
    query.params.fields = validate_fields(query.raw_fields, schema)
    return query


def validate_filter(value: Any, schema: dict[str, str]) -> Filter | None:
    """A filter (JSON value, or JSON text from a form) -> a checked ``Filter``; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if len(value) > MAX_FILTER_TEXT:
            raise ApiError(422, "invalid_filter", f"filter is over {MAX_FILTER_TEXT} characters")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise ApiError(422, "invalid_filter", f"filter is not JSON: {e}") from None
    try:
        return parse_filter(value, schema)
    except FilterError as e:
        raise ApiError(422, e.code, str(e), {"path": e.path}) from None
    except RecursionError:  # deeper than Python goes: far past MAX_DEPTH
        raise ApiError(422, "invalid_filter", "filter nests too deep") from None


def validate_fields(value: Any, schema: dict[str, str]) -> tuple[str, ...] | None:
    """``fields``: a list of column names, or a comma-separated string (a JSON list's text too);
    absent -> None (every column), ``[]`` or ``""`` -> none."""
    if value is _UNSET or value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as e:
                raise ApiError(422, "invalid_fields", f"fields is not a JSON list: {e}") from None
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(422, "invalid_fields", "fields must be a list of metadata column names")
    unknown = [v for v in value if v not in schema]
    if unknown:
        known = ", ".join(schema) or "none: this store has no metadata columns"
        raise ApiError(422, "unknown_field", f"fields names unknown columns {unknown} ({known})")
    return tuple(dict.fromkeys(value))


MAX_METADATA_BYTES = 64 * 1024
MAX_URI_CHARS = 2048


@dataclass
class ParsedAdd:
    """A validated ``POST /images``: an image to embed or a ready vector, plus its row fields."""

    kind: str  # "image" or "vector"
    image: bytes | None = None
    vector: np.ndarray | None = None
    row_id: str | None = None  # None: the content hash
    uri: str | None = None
    raw_metadata: dict | None = None  # a JSON object, not yet checked against the schema
    metadata: dict | None = None  # typed values of the store's columns (check_add_metadata)


def _validate_metadata(value: Any) -> dict | None:
    """``metadata`` as a JSON object (an object, or its JSON text from a form), size-checked."""
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise ApiError(422, "invalid_metadata", f"metadata is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", "metadata must be a JSON object")
    try:
        text = json.dumps(value, allow_nan=False)
    except (ValueError, RecursionError) as e:
        raise ApiError(422, "invalid_metadata", f"metadata is not plain JSON: {e}") from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise ApiError(422, "invalid_metadata", f"metadata is over {MAX_METADATA_BYTES} bytes")
    return value


def check_add_metadata(add: ParsedAdd, schema: dict[str, str]) -> ParsedAdd:
    """Check ``POST /images``'s metadata against the store's schema: known columns, values of
    their types (ints widen to float columns); 422 ``invalid_metadata`` names the field."""
    if add.raw_metadata is None:
        add.metadata = None
        return add
    try:
        add.metadata = check_record(add.raw_metadata, schema)
    except MetadataError as e:
        raise ApiError(422, "invalid_metadata", str(e)) from None
    return add


def _validate_uri(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or len(value) > MAX_URI_CHARS or not is_unicode(value):
        raise ApiError(422, "invalid_uri", f"uri must be a string of <= {MAX_URI_CHARS} chars")
    return value


def _text_field(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


async def parse_add(request: Request, limits: Limits, dim: int, normalise: bool) -> ParsedAdd:
    """``POST /images``: multipart ``file`` (+ ``id``, ``uri``, ``metadata`` fields) or JSON
    ``{"vector", "id", "uri", "metadata"}``; ``id``/``uri`` may also come in the query string."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, Any]
    if content_type == "multipart/form-data":
        body = await read_body(request, limits.max_upload_bytes + MULTIPART_OVERHEAD)
        fields = await _parse_multipart(request, body)
        unknown = sorted(set(fields) - {"file", "id", "uri", "metadata"})
        if unknown:
            raise ApiError(422, "invalid_parameter", f"unknown fields: {', '.join(unknown)}")
    elif content_type in ("application/json", "") or content_type.endswith("+json"):
        body = await read_body(request, MAX_JSON_BYTES)
        try:
            fields = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, "invalid_json", f"body is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise ApiError(400, "invalid_json", "body must be a JSON object")
        unknown = sorted(set(fields) - {"vector", "id", "uri", "metadata"})
        if unknown:
            raise ApiError(422, "invalid_parameter", f"unknown fields: {', '.join(unknown)}")
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type!r}: send multipart/form-data (file) or JSON (vector)",
        )
    row_id = _text_field(fields.get("id", request.query_params.get("id")))
    parsed = ParsedAdd(
        kind="image",
        row_id=None if row_id in (None, "") else validate_id(row_id),
        uri=_validate_uri(fields.get("uri", request.query_params.get("uri"))),
        raw_metadata=_validate_metadata(fields.get("metadata")),
    )
    image, vector = fields.get("file"), fields.get("vector")
    if image is not None and vector is not None:
        raise ApiError(400, "ambiguous_query", "give a file or a vector, not both")
    if vector is not None:
        parsed.kind, parsed.vector = "vector", validate_vector(vector, dim, normalise)
        return parsed
    if image is None:
        raise ApiError(400, "missing_image", "send a multipart 'file' (or a JSON 'vector')")
    parsed.image = image.encode() if isinstance(image, str) else image
    if len(parsed.image) > limits.max_upload_bytes:
        raise ApiError(
            413,
            "too_large",
            f"file of {len(parsed.image)} bytes > limit {limits.max_upload_bytes}",
        )
    return parsed


def keyed(request: Request) -> bool:
    """Whether the ingress marked this request as carrying the API key (``serve.security``)."""
    return bool(getattr(request.state, "keyed", False))


def _request_id(request: Request) -> str:
    """The client's ``x-request-id``, else the one Serve gave the request (in its logs)."""
    given = request.headers.get("x-request-id", "")
    if given:
        return given
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or ""
    except Exception:  # outside a Serve replica
        return ""


# ---- the FastAPI app and its error handlers --------------------------------------------------
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def create_app() -> FastAPI:
    app = FastAPI(
        title="Visual search",
        version="0.1.0",
        description=(
            "Find the catalogue images most similar to an uploaded image, a vector or a catalogue "
            "id. The query is scattered to every shard and the per-shard top candidates, "
            "reranked with full-precision vectors, are merged. Errors are JSON "
            '`{"error": "<reason_code>", "detail": "..."}`.'
        ),
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        from serve.security import public_error  # imports this module

        body = exc.body() if keyed(request) else public_error(exc.body())
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # routing refusals (unknown path 404, wrong method 405) in the same JSON error shape
        error = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": error, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
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
        request_id = _request_id(request)
        log.error("unhandled %s (request %s)", type(exc).__name__, request_id, exc_info=exc)
        detail = f"{type(exc).__name__}: {exc}" if keyed(request) else "internal error"
        if request_id and not keyed(request):
            detail += f"; the server log has it under request id {request_id}"
        return JSONResponse({"error": "internal", "detail": detail}, status_code=500)

    return app
