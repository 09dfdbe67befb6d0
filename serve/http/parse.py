"""Reading a request: the body (size-limited, JSON or multipart), into a checked query or row.

``POST /search`` is one of: a multipart ``file`` (an image to embed), a JSON ``vector`` or a JSON
``id`` (or ``?id=``: a catalogue row's neighbours), or a JSON ``text`` (models with a text tower).
``text`` may also come with any of the others (a JSON field, or a form field beside the ``file``):
a mixed query, weighted by ``text_weight`` (``serve.deployments.query_model``). Its parameters
come from the query string; a JSON body or multipart form fields of the same names override them
(``serve.http.validate``).

Writes (issue #5): ``POST /images`` takes a multipart ``file`` (or JSON ``vector`` for apps of
external embeddings) with optional ``id`` (default: the content hash of the bytes), ``uri`` and
``metadata`` (a JSON object of the store's typed columns). These need the API key
(``serve.http.security``).

The body is read as a stream and refused (413) as soon as it passes the limit, never buffered
whole. ``filter``, ``fields`` and ``metadata`` are kept as given (``raw_*``) and checked against
the store's schema by ``resolve_metadata`` / ``check_add_metadata`` (``serve.http.metadata``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from serve.http.errors import ApiError
from serve.http.limits import Limits
from serve.http.metadata import (
    UNSET,
    check_filter_size,
    check_metadata,
    validate_fields,
    validate_filter,
    validate_metadata,
    validate_uri,
)
from serve.http.validate import (
    SearchParams,
    validate_id,
    validate_params,
    validate_text,
    validate_text_weight,
    validate_vector,
)

_MISSING = "send a multipart 'file', or JSON 'vector', 'id' or 'text'"
MAX_JSON_BYTES = 4 * 1024 * 1024  # a 4096-d vector as JSON text is ~100 KB
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, headers and small form fields around the file


@dataclass
class ParsedQuery:
    kind: str  # "image", "vector", "id" or "text"
    params: SearchParams
    image: bytes | None = None
    vector: np.ndarray | None = None
    row_id: str | None = None
    raw_filter: Any = None  # the request's ``filter`` as given (JSON value or text)
    raw_fields: Any = UNSET  # the request's ``fields`` as given
    query_fields: Any = UNSET  # ``fields`` in the query string (checked even when overridden)
    limits: Limits | None = None  # the caller's (the filter's size is checked against them)
    text: str | None = None  # a text query, alone (kind "text") or mixed into the others
    text_weight: float | None = None  # the text's share of a mixed query (0..1)


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
    query_fields = request.query_params.get("fields", UNSET)
    extras: dict[str, Any] = {"filter": None, "fields": query_fields}
    extras.update(text=None, text_weight=None)
    query = await _parse_search(request, limits, dim, normalise, extras)
    if extras["text"] is not None:
        query.text = validate_text(extras["text"])
    elif extras["text_weight"] is not None:
        raise ApiError(422, "invalid_parameter", "text_weight without a text: give both")
    query.text_weight = validate_text_weight(extras["text_weight"])
    query.raw_filter, query.raw_fields = extras["filter"], extras["fields"]
    query.query_fields = query_fields
    query.limits = limits
    return query


async def _parse_search(
    request: Request, limits: Limits, dim: int, normalise: bool, extras: dict[str, Any]
) -> ParsedQuery:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw: dict[str, Any] = {key: request.query_params.get(key) for key in _PARAM_KEYS}
    # a body's value overrides the query string's, but a query string value out of its range is
    # refused all the same: what the request says anywhere is checked (the document's rule)
    validate_params(raw, limits)
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
            if query_id is None:  # a text goes as JSON; as a form field, beside a file
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
                    400,
                    "missing_query",
                    "send a multipart 'file', or JSON 'vector', 'id' or 'text'",
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
        refuse_nulls(data)
        raw.update({k: data[k] for k in _PARAM_KEYS if k in data})
        extras.update({k: data[k] for k in extras if k in data})
        weight = data.get("text_weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float)):
            raise ApiError(422, "invalid_parameter", "text_weight must be a number in 0..1")
        row_id = data.get("id", query_id)
        candidates = (("vector", data.get("vector")), ("id", row_id))
        given = [name for name, value in candidates if value is not None]
        if not given and "text" in data:
            return ParsedQuery("text", validate_params(raw, limits))
        if not given:
            raise ApiError(400, "missing_query", _MISSING)
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
    "shards_probe",
    *("expand", "expand_m", "expand_alpha", "diversify", "dedup", "exclude_self", "min_score"),
    "verify",
)


def refuse_nulls(data: dict[str, Any]) -> None:
    """A JSON body's field is a value or absent, never ``null`` (the document's types have no
    null there, so a generated client never sends one): 422 naming the fields."""
    nulls = sorted(key for key, value in data.items() if value is None)
    if nulls:
        raise ApiError(
            422, "invalid_parameter", f"null given for {', '.join(nulls)}: leave those out"
        )


def resolve_metadata(query: ParsedQuery, schema: dict[str, str]) -> ParsedQuery:
    """Check the query's raw ``filter`` and ``fields`` against the store's metadata ``schema``
    (and the filter's size against the caller's limits) and set ``query.params.filter`` /
    ``.fields``; ApiError 422 names the problem."""
    query.params.filter = check_filter_size(
        validate_filter(query.raw_filter, schema), query.limits or Limits()
    )
    query.params.fields = validate_fields(query.raw_fields, schema)
    if query.query_fields is not query.raw_fields:  # overridden by the body: still checked
        validate_fields(query.query_fields, schema)
    return query


def check_add_metadata(add: ParsedAdd, schema: dict[str, str]) -> ParsedAdd:
    """Check ``POST /images``'s metadata against the store's schema and set ``add.metadata``
    (``serve.http.metadata.check_metadata``)."""
    add.metadata = check_metadata(add.raw_metadata, schema)
    return add


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
        refuse_nulls(fields)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type!r}: send multipart/form-data (file) or JSON (vector)",
        )
    row_id = _text_field(fields.get("id", request.query_params.get("id")))
    uri = fields.get("uri", request.query_params.get("uri"))
    if "" in (row_id, _text_field(uri)):  # given, but empty: the document's minLength is 1
        empty = "id" if row_id == "" else "uri"
        raise ApiError(422, f"invalid_{empty}", f"{empty} is empty: leave it out for the default")
    parsed = ParsedAdd(
        kind="image",
        row_id=None if row_id is None else validate_id(row_id, new=True),
        uri=validate_uri(uri),
        raw_metadata=validate_metadata(fields.get("metadata")),
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
