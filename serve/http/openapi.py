"""The app's OpenAPI document, exact for the store it serves, so a client generated from it works.

FastAPI derives a document from the route signatures, but the ingress reads ``POST /search``'s
and ``POST /images``' bodies itself (streamed, with a size limit), and what they accept depends
on the store: the vector length is the catalogue's dimension, the metadata columns and their
types are the manifest's, image uploads exist only when the app embeds images, and the limits
are the config's (``k``, ``nprobe``, ``candidates``, filter nodes and the shaping pool: an
anonymous caller's caps, ``serve.http.limits``, each description saying that the key lifts it; a
caller with the key may go up to ``max_*``). ``document`` takes FastAPI's document and writes
those two operations out exactly:

- ``POST /search``: JSON ``{"vector": [dim numbers, not all zero]}`` or ``{"id": "..."}`` (one
  of them; ``additionalProperties: false``) with ``k``, ``nprobe``, ``rerank``, ``candidates``,
  the answer-shaping options (``expand``, ``diversify``, ``dedup``, ...),
  ``filter`` (``#/components/schemas/Filter``: one condition schema per column and operator,
  ``index.query.filters.openapi_schema``) and ``fields`` (an array of the column names); or
  multipart
  with a ``file`` (``encoding``: image types) and the same fields as form fields (``filter`` as
  JSON text); query parameters with their real ranges (``fields`` as a comma-separated pattern);
- with a text tower (``text_queries``): a third JSON form ``{"text": "..."}``, and ``text`` +
  ``text_weight`` beside the vector, id and file forms (a mixed query);
- ``POST /images``: JSON ``{"vector", "id", "uri", "metadata"}`` or multipart ``file`` + ``id``,
  ``uri``, ``metadata`` (JSON text), where ``metadata`` is ``#/components/schemas/Metadata``:
  the store's columns with their types, nothing else;
- results' ``metadata`` is that object too; write operations name the API key schemes when the
  app has a key.

The ingress deployment installs the document on its FastAPI app (``install``: the app's
``openapi`` becomes ``app_document(app)``, so this module never needs to know where the app is
made); its replica calls ``set_context`` with what it read from the manifest (``serve.catalog``).
The context lives here, in an importable module, on purpose: Serve pickles the ingress class by
value (its ``serve.ingress`` decorator makes a new class), so state kept in the ingress module's
globals would be copied into the replica instead of shared with the app's ``openapi``.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field

from fastapi import FastAPI

from index.query import shaping
from index.query.filters import MAX_CHILDREN
from index.query.filters import openapi_schema as filter_schema
from index.rows.metadata import INT64_MAX, INT64_MIN, MAX_STRING_CHARS
from serve.http.limits import Limits
from serve.http.metadata import MAX_URI_CHARS
from serve.http.validate import DEFAULT_TEXT_WEIGHT, FLOAT32_MAX, MAX_ID_CHARS, MAX_TEXT_CHARS

FILTER_REF = "#/components/schemas/Filter"
METADATA_REF = "#/components/schemas/Metadata"
BINARY = {"type": "string", "format": "binary"}
# an upload: the bytes of an image file in one of IMAGE_TYPES (the app sniffs the bytes, not the
# part's Content-Type); empty is 422 ``empty``, other bytes 415 ``not_an_image``
IMAGE_FILE = {
    **BINARY,
    "minLength": 1,
    "description": "the bytes of a JPEG, PNG, WebP, GIF, BMP or TIFF image, not empty; other "
    "bytes are refused: 422 empty, 415 not_an_image, 413 too_large or decompression_bomb",
}
# a row id: the /images/{id} routes could never name one holding a "/" (validate.validate_id)
ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "pattern": "^[^/]+$"}
IMAGE_TYPES = "image/jpeg, image/png, image/webp, image/gif, image/bmp, image/tiff"
_VALUE = {
    "string": {"type": ["string", "null"], "maxLength": MAX_STRING_CHARS},
    "int": {"type": ["integer", "null"], "minimum": INT64_MIN, "maximum": INT64_MAX},
    "float": {"type": ["number", "null"]},
    "bool": {"type": ["boolean", "null"]},
}


_STATE: dict = {"context": None, "doc": None}


def set_context(ctx: OpenApiContext) -> None:
    """What this process's app serves (the Ingress replica calls it at start and when the
    store's metadata schema grows); the next ``app_document`` builds from it."""
    _STATE["context"], _STATE["doc"] = ctx, None


def app_document(app: FastAPI) -> dict:
    """``app``'s document for the current context (built once per context)."""
    if _STATE["doc"] is None:
        _STATE["doc"] = document(FastAPI.openapi(app), _STATE["context"] or OpenApiContext())
    return _STATE["doc"]


def install(app: FastAPI) -> None:
    """Make ``app``'s ``/openapi.json`` this module's exact document (``app_document``). A
    ``functools.partial`` of a module function, not a closure: it pickles (Serve copies the app
    into each replica) by reference to this module, with the app it belongs to."""
    app.openapi = functools.partial(app_document, app)


@dataclass
class OpenApiContext:
    """What the document depends on; ``dim`` None: not known (no Ingress in this process)."""

    dim: int | None = None
    metric: str = "ip"
    num_shards: int | None = None
    routed: bool = False  # a routed store (index.ann.routing): ``shards_probe`` is a parameter
    metadata: dict[str, str] = field(default_factory=dict)
    image_queries: bool = True
    text_queries: bool = False  # the model has a text tower: ``text`` (and mixed) queries
    api_key: bool = False
    limits: Limits = field(default_factory=Limits)


def document(base: dict, ctx: OpenApiContext) -> dict:
    """FastAPI's ``base`` document with the search and add operations spelled out for ``ctx``."""
    doc = copy.deepcopy(base)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Filter"] = filter_schema(ctx.metadata, FILTER_REF)
    _bounded_filter(schemas, ctx.limits.max_filter_nodes)
    nodes = f"a filter of at most {ctx.limits.max_filter_nodes} nodes (conditions, and, or, not)"
    schemas["Filter"]["description"] = _capped(ctx.limits, nodes)
    schemas["Metadata"] = metadata_schema(ctx.metadata)
    for name in ("Result", "AddResponse"):
        if name in schemas:
            schemas[name]["properties"]["metadata"] = {"$ref": METADATA_REF}
    paths = doc.get("paths", {})
    search = paths.get("/search", {}).get("post")
    if search is not None:
        search["requestBody"] = search_body(ctx)
        search["parameters"] = search_parameters(ctx)
    add = paths.get("/images", {}).get("post")
    if add is not None:
        add["requestBody"] = add_body(ctx)
        add.get("responses", {}).get("201", {})["links"] = ROW_LINKS
    for operation in [
        *paths.get("/images/{image_id}", {}).values(),
        *paths.get("/images/{image_id}/thumbnail", {}).values(),
    ]:
        _set_parameter(operation, "image_id", ID)  # validate_id's rule, not any string
    record = paths.get("/images/{image_id}", {}).get("get")
    if record is not None:  # the same columns as a search's ``fields``
        _set_parameter(record, "fields", _fields_pattern(ctx.metadata))
    rebuild = paths.get("/admin/rebuild", {}).get("post")
    if rebuild is not None and ctx.num_shards is not None:
        shard = {"type": "integer", "minimum": 0, "maximum": ctx.num_shards - 1}
        _set_parameter(rebuild, "shard", {**shard, "description": "one shard (default: all)"})
    if ctx.api_key:
        _security(doc)
    return doc


# what a 201 of POST /images promises: the row, and deleting it. Not its thumbnail: that exists
# only when the answer's ``thumbnail`` is true (its uri lies under ``thumbnail_roots``)
ROW_LINKS = {
    "GetImage": {
        "operationRef": "#/paths/~1images~1{image_id}/get",
        "parameters": {"image_id": "$response.body#/id"},
        "description": "the row just added",
    },
    "DeleteImage": {
        "operationRef": "#/paths/~1images~1{image_id}/delete",
        "parameters": {"image_id": "$response.body#/id"},
        "description": "hide the row again",
    },
}


def _bounded_filter(schemas: dict, cap: int) -> None:
    """The document's filter form: every filter it allows fits an anonymous caller's node cap
    (``filter_too_large`` otherwise, and a node count is no JSON Schema keyword), so two levels:
    a condition (``FilterCondition``, one per column and operator), ``not`` of one
    (``FilterNot``), or ``and``/``or`` of at most ``cap - 1`` conditions (``FilterAnd``,
    ``FilterOr``): exactly the longest list the cap takes. The app takes any nesting within the
    cap (``index.query.filters``); a client sends deeper filters with the key. Named schemas,
    not anonymous ``oneOf`` members, and one ``FilterRange`` for every numeric column's bounds:
    a client generator (openapi-python-client) drops the filter or its ranges otherwise."""
    conditions = []
    for branch in schemas["Filter"].pop("oneOf"):
        properties = branch.get("properties", {})
        if next(iter(properties), "") in ("and", "or", "not"):
            continue
        if "range" in properties:
            schemas["FilterRange"] = properties["range"]
            properties["range"] = {"$ref": "#/components/schemas/FilterRange"}
        conditions.append(branch)
    if not conditions:  # no columns: no filter matches anything
        schemas["Filter"]["not"] = {}
        return
    schemas["FilterCondition"] = {"oneOf": conditions, "description": "a condition on a column"}
    forms = ["FilterCondition"]
    if cap >= 2:
        schemas["FilterNot"] = _object({"not": _ref("FilterCondition")}, ["not"])
        forms.append("FilterNot")
    items = min(MAX_CHILDREN, cap - 1)
    if items >= 1:
        clause = _ref("FilterCondition")
        for key in ("and", "or"):
            name = f"Filter{key.capitalize()}"
            array = {"type": "array", "items": clause, "minItems": 1, "maxItems": items}
            schemas[name] = _object({key: array}, [key])
            forms.append(name)
    schemas["Filter"]["oneOf"] = [_ref(name) for name in forms]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _set_parameter(operation: dict, name: str, schema: dict) -> None:
    """Give ``operation``'s parameter ``name`` the exact ``schema`` (FastAPI's says string/int)."""
    for parameter in operation.get("parameters", []):
        if parameter.get("name") == name:
            parameter["schema"] = schema


def metadata_schema(metadata: dict[str, str]) -> dict:
    return {
        "type": "object",
        "description": "metadata columns of the store (types from its manifest); null = absent",
        "properties": {name: dict(_VALUE[kind]) for name, kind in metadata.items()},
        "additionalProperties": False,
    }


def vector_schema(ctx: OpenApiContext) -> dict:
    vector: dict = {
        "type": "array",
        "items": {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX},
        "description": "a query or catalogue vector of the catalogue's dimension",
    }
    if ctx.dim is not None:
        vector["minItems"] = vector["maxItems"] = ctx.dim
    if ctx.metric == "ip":  # cosine: a zero vector has no direction
        vector["not"] = {"items": {"const": 0}}
    return vector


def _shards_probe(ctx: OpenApiContext) -> dict:
    """``shards_probe`` in a routed store (1..its shards); a hashed store visits every shard."""
    if not ctx.routed or ctx.num_shards is None:
        return {}
    return {
        "shards_probe": {
            "type": "integer",
            "minimum": 1,
            "maximum": ctx.num_shards,
            "description": "shards visited, nearest the query first (default: the router's)",
        }
    }


def _capped(limits: Limits, text: str) -> str:
    """A parameter's description, saying that the key lifts an anonymous caller's cap."""
    return f"{text}; callers with the API key may ask more" if limits.hint else text


def _params(ctx: OpenApiContext) -> dict:
    limits = ctx.limits
    pool = _capped(limits, f"chosen from at most {limits.max_shape_pool} merged hits")
    return {
        "k": {
            "type": "integer",
            "minimum": 1,
            "maximum": limits.max_k,
            "description": _capped(limits, f"results, at most {limits.max_k}"),
        },
        "nprobe": {
            "type": "integer",
            "minimum": 1,
            "maximum": limits.max_nprobe,
            "description": _capped(limits, f"IVF lists probed, at most {limits.max_nprobe}"),
        },
        "rerank": {"type": "boolean"},
        **_shards_probe(ctx),
        "candidates": {
            "type": "integer",
            "minimum": 1,
            "maximum": limits.max_candidates,
            "description": _capped(limits, f"rerank candidates, at most {limits.max_candidates}"),
        },
        # answer shaping (index.query.shaping, serve.http.validate.validate_shape)
        "expand": {"type": "boolean"},
        "expand_m": {"type": "integer", "minimum": 1, "maximum": shaping.MAX_EXPAND_M},
        "expand_alpha": {"type": "number", "minimum": 0, "maximum": shaping.MAX_EXPAND_ALPHA},
        "diversify": {
            "anyOf": [{"type": "boolean"}, {"type": "number", "minimum": 0, "maximum": 1}],
            "description": f"MMR lambda; {pool}",
        },
        "dedup": {
            "anyOf": [{"type": "boolean"}, {"type": "number", "exclusiveMinimum": 0}],
            "description": f"near-duplicate threshold; {pool}",
        },
        "exclude_self": {"type": "boolean"},
        "min_score": {"type": "number"},
        "verify": {
            "type": "boolean",
            "description": "image queries: re-order the results by geometric verification",
        },
    }


def _fields_pattern(metadata: dict[str, str]) -> dict:
    names = "|".join(re.escape(name) for name in metadata)
    pattern = f"^$|^({names})(,({names}))*$" if names else "^$"
    return {
        "type": "string",
        "pattern": pattern,
        "description": "comma-separated metadata columns to return (default: all; empty: none)",
    }


def search_parameters(ctx: OpenApiContext) -> list[dict]:
    params = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in _params(ctx).items()
    ]
    fields = _fields_pattern(ctx.metadata)
    params.append({"name": "fields", "in": "query", "required": False, "schema": fields})
    return params


def search_body(ctx: OpenApiContext) -> dict:
    common = dict(_params(ctx))
    if ctx.metadata:
        common["filter"] = {"$ref": FILTER_REF}
    common["fields"] = {
        "type": "array",
        "items": {"type": "string", "enum": list(ctx.metadata)} if ctx.metadata else {"not": {}},
        "description": "metadata columns to return (default: all; []: none; a repeat is one)",
    }
    text = _text_fields() if ctx.text_queries else {}
    by_vector = _object({"vector": vector_schema(ctx), **common, **text}, ["vector"])
    by_id = _object({"id": ID, **common, **text}, ["id"])
    forms = [by_vector, by_id]
    what = "a vector, or the id of a catalogue row (its neighbours)"
    if text:
        forms.append(_object({**text, **common}, ["text"]))
        what += (
            ", or a text (the model's text tower); a text beside a vector or an id mixes "
            "the two by text_weight"
        )
    content = {
        "application/json": {
            "schema": {
                "type": "object",
                "oneOf": forms,
                # what every form shares, at the top too (the search page looks for "filter")
                "properties": common,
                "description": what,
            }
        }
    }
    if ctx.image_queries:
        form = {**_params(ctx), **text}
        if ctx.metadata:
            form["filter"] = {"$ref": FILTER_REF}
        form["fields"] = _fields_pattern(ctx.metadata)
        content = {**_upload(form, "filter"), **content}
    return {"required": True, "content": content}


def _text_fields() -> dict:
    """``text`` and ``text_weight`` (``serve.http.validate``, ``serve.deployments.query_model``)."""
    return {
        "text": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_TEXT_CHARS,
            "description": "a text query, embedded by the model's text tower (CLIP, SigLIP); "
            "beside an image, a vector or an id: a mixed query",
        },
        "text_weight": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "a mixed query's text share: normalize((1 - w) * query + w * text), "
            f"default {DEFAULT_TEXT_WEIGHT}",
        },
    }


def add_body(ctx: OpenApiContext) -> dict:
    row = {
        "id": ID,
        "uri": {"type": "string", "minLength": 1, "maxLength": MAX_URI_CHARS},
        "metadata": {"$ref": METADATA_REF},
    }
    content = {
        "application/json": {
            "schema": _object({"vector": vector_schema(ctx), **row}, ["vector"]),
        }
    }
    if ctx.image_queries:
        content = {**_upload(row, "metadata"), **content}
    return {"required": True, "content": content}


def _upload(fields: dict, json_field: str) -> dict:
    """A multipart body: an image ``file`` and form ``fields``, ``json_field`` as JSON text."""
    return {
        "multipart/form-data": {
            "schema": _object({"file": IMAGE_FILE, **fields}, ["file"]),
            "encoding": {
                "file": {"contentType": IMAGE_TYPES},
                json_field: {"contentType": "application/json"},
            },
        }
    }


def _object(properties: dict, required: list[str]) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


WRITE_OPERATIONS = (
    ("/images", "post"),
    ("/images/{image_id}", "delete"),
    ("/admin/rebuild", "post"),
    ("/admin/rebuild", "get"),
)


def _security(doc: dict) -> None:
    schemes = doc["components"].setdefault("securitySchemes", {})
    schemes["bearer"] = {"type": "http", "scheme": "bearer"}
    schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, method in WRITE_OPERATIONS:
        operation = doc.get("paths", {}).get(path, {}).get(method)
        if operation is not None:
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
