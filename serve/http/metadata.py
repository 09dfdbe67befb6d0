"""A request's metadata values: ``filter``, ``fields``, ``metadata`` (the store's schema), ``uri``.

Results carry ``metadata``, the row's columns named by ``fields`` (a JSON list, or a
comma-separated string in the query string or a form; default: every column of the store's
schema; ``[]`` or ``""``: none). ``filter`` (a JSON object in the body, or JSON text in a
multipart field) restricts the search to rows that match it, in the form of
``index.query.filters``: ``{"field": name, "eq"|"in"|"range"|"exists": ...}`` and
``{"and"|"or": [...]}``, ``{"not": ...}``. ``POST /images`` takes ``metadata`` as an object of the
store's typed columns. All are checked against the store's metadata schema (the manifest's),
which can grow while the app runs: the request parsers keep the raw values and these functions
check them, so the ingress can re-read a schema that grew and check again without reading the
body twice (``serve.catalog``).
"""

from __future__ import annotations

import json
from typing import Any

from index.query.filters import And, Filter, FilterError, Not, Or, parse_filter
from index.rows.metadata import MetadataError, check_record, is_unicode
from serve.http.errors import ApiError
from serve.http.limits import Limits

UNSET = object()  # a raw ``filter``/``fields`` that was not given
MAX_FILTER_TEXT = 64 * 1024
MAX_METADATA_BYTES = 64 * 1024
MAX_URI_CHARS = 2048


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


def filter_nodes(node: Filter) -> int:
    """How many nodes a parsed filter has (conditions and ``and``/``or``/``not``): the passes
    over every row of every shard it costs."""
    if isinstance(node, And | Or):
        return 1 + sum(filter_nodes(item) for item in node.items)
    if isinstance(node, Not):
        return 1 + filter_nodes(node.item)
    return 1


def check_filter_size(node: Filter | None, limits: Limits) -> Filter | None:
    """Refuse (422 ``filter_too_large``, naming the cap) a filter of more nodes than the
    caller's ``max_filter_nodes`` (anonymous callers: ``anon_max_filter_nodes``)."""
    if node is not None and (nodes := filter_nodes(node)) > limits.max_filter_nodes:
        raise ApiError(
            422,
            "filter_too_large",
            limits.over(f"a filter has at most {limits.max_filter_nodes} nodes, got {nodes}"),
        )
    return node


def validate_fields(value: Any, schema: dict[str, str]) -> tuple[str, ...] | None:
    """``fields``: a list of column names, or a comma-separated string (a JSON list's text too);
    absent -> None (every column), ``[]`` or ``""`` -> none."""
    if value is UNSET or value is None:
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


def validate_metadata(value: Any) -> dict | None:
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


def check_metadata(value: dict | None, schema: dict[str, str]) -> dict | None:
    """A row's ``metadata`` (a JSON object) against the store's schema: known columns, values of
    their types (ints widen to float columns); 422 ``invalid_metadata`` names the field."""
    if value is None:
        return None
    try:
        return check_record(value, schema)
    except MetadataError as e:
        raise ApiError(422, "invalid_metadata", str(e)) from None


def validate_uri(value: Any) -> str | None:
    """A row's ``uri``: a string of at most ``MAX_URI_CHARS`` (absent or empty: None)."""
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or len(value) > MAX_URI_CHARS or not is_unicode(value):
        raise ApiError(422, "invalid_uri", f"uri must be a string of <= {MAX_URI_CHARS} chars")
    return value
