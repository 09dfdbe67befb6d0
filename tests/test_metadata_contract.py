"""The metadata parts of the HTTP contract without Ray: filter, fields and metadata checks map to
their 422 reason codes, and the OpenAPI document says exactly what the store accepts."""

from __future__ import annotations

import jsonschema_rs
import numpy as np
import pytest

from index.query.filters import And, Eq, Range
from serve.http.errors import ApiError
from serve.http.fastapi_app import create_app
from serve.http.limits import Limits
from serve.http.metadata import validate_fields, validate_filter
from serve.http.openapi import OpenApiContext, document
from serve.http.parse import ParsedAdd, ParsedQuery, check_add_metadata, resolve_metadata
from serve.http.validate import SearchParams, validate_vector

SCHEMA = {"category": "string", "price": "float", "in_stock": "bool", "qty": "int"}


def _raises(status: int, error: str, fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert (info.value.status, info.value.error) == (status, error), info.value
    return info.value


def test_filter_and_fields_checks_name_their_problems():
    assert validate_filter(None, SCHEMA) is None and validate_filter("", SCHEMA) is None
    text = '{"and": [{"field": "price", "range": {"lt": 50}}, {"field": "in_stock", "eq": true}]}'
    assert validate_filter(text, SCHEMA) == And((Range("price", lt=50), Eq("in_stock", True)))
    e = _raises(422, "unknown_field", validate_filter, {"field": "colour", "eq": "x"}, SCHEMA)
    assert "'colour'" in e.detail and e.body()["path"] == "filter.field"
    _raises(422, "wrong_type", validate_filter, {"field": "qty", "eq": "3"}, SCHEMA)
    _raises(422, "invalid_filter", validate_filter, "{nope", SCHEMA)
    _raises(422, "invalid_filter", validate_filter, "[" * 100_000, SCHEMA)
    _raises(422, "invalid_filter", validate_filter, {"field": "category", "eq": "\ud800"}, SCHEMA)
    assert validate_fields("price, qty", SCHEMA) == ("price", "qty")
    assert validate_fields('["qty", "qty"]', SCHEMA) == ("qty",)
    assert validate_fields("", SCHEMA) == () and validate_fields([], SCHEMA) == ()
    _raises(422, "unknown_field", validate_fields, ["price", "colour"], SCHEMA)
    _raises(422, "invalid_fields", validate_fields, {"price": 1}, SCHEMA)
    _raises(422, "invalid_fields", validate_fields, "[1,", SCHEMA)
    query = ParsedQuery("vector", SearchParams(10, None, True, None))
    query.raw_filter, query.raw_fields = {"field": "qty", "exists": True}, "category"
    resolved = resolve_metadata(query, SCHEMA).params
    assert resolved.filter is not None and resolved.fields == ("category",)


def test_added_metadata_is_typed_by_the_schema():
    add = ParsedAdd("vector", raw_metadata={"price": 3, "qty": 2.0, "category": None})
    assert check_add_metadata(add, SCHEMA).metadata == {"price": 3.0, "qty": 2, "category": None}
    for bad in ({"colour": 1}, {"qty": 1.5}, {"in_stock": "true"}, {"category": "\ud800"}):
        _raises(
            422,
            "invalid_metadata",
            check_add_metadata,
            ParsedAdd("vector", raw_metadata=bad),
            SCHEMA,
        )


def test_vector_norms_in_float64_tiny_and_huge_directions():
    assert np.allclose(validate_vector([1e-300, 0.0, 0.0], 3, True), [1, 0, 0])
    assert np.allclose(validate_vector([3e38, 3e38, 0.0], 3, True), [0.7071, 0.7071, 0], atol=1e-4)
    _raises(422, "zero_vector", validate_vector, [0.0, -0.0, 0], 3, True)
    _raises(422, "non_finite_vector", validate_vector, [1e39, 0.0, 0.0], 3, True)


def _doc(**ctx) -> dict:
    app = create_app()

    @app.post("/search")
    async def search(k: int | None = None, fields: str | None = None):  # noqa: ARG001
        return {}

    @app.post("/images")
    async def add():
        return {}

    return document(app.openapi(), OpenApiContext(**ctx))


def test_openapi_says_exactly_what_search_and_images_accept():
    doc = _doc(
        dim=4, metadata=SCHEMA, limits=Limits(max_nprobe=64, max_candidates=500), api_key=True
    )
    body = doc["paths"]["/search"]["post"]["requestBody"]["content"]
    by_vector, by_id = body["application/json"]["schema"]["oneOf"]
    assert (
        by_vector["properties"]["vector"]["minItems"]
        == 4
        == by_vector["properties"]["vector"]["maxItems"]
    )
    assert by_vector["additionalProperties"] is False and by_id["required"] == ["id"]
    assert by_vector["properties"]["nprobe"]["maximum"] == 64
    assert body["multipart/form-data"]["encoding"]["filter"]["contentType"] == "application/json"
    params = {p["name"]: p["schema"] for p in doc["paths"]["/search"]["post"]["parameters"]}
    shaping = {"expand", "expand_m", "expand_alpha", "diversify", "dedup", "exclude_self", "verify"}
    assert set(params) == {"k", "nprobe", "rerank", "candidates", "fields", "min_score"} | shaping
    assert "id" not in params  # the JSON body's, not documented in the query string
    schemas = doc["components"]["schemas"]
    # the document is a valid JSON Schema, and it accepts exactly the filters the store does
    # (and/or/not and the range bounds are named schemas of their own: FilterAnd, ...)
    defs = {name: _rewrite_refs(s) for name, s in schemas.items() if name.startswith("Filter")}
    assert set(defs) == {
        "Filter",
        "FilterCondition",
        "FilterAnd",
        "FilterOr",
        "FilterNot",
        "FilterRange",
    }
    validator = jsonschema_rs.validator_for({"$defs": defs, **defs["Filter"]})
    good = {"and": [{"field": "price", "range": {"lt": 5}}, {"field": "qty", "in": [1, 2]}]}
    assert validator.is_valid(good) and validate_filter(good, SCHEMA)
    for bad in (
        {"field": "colour", "eq": 1},
        {"field": "category", "range": {"lt": 1}},
        {"field": "in_stock", "eq": 1},
        {"field": "price", "eq": 1, "in": [1]},
        {"and": []},
    ):
        assert not validator.is_valid(bad), bad
        with pytest.raises(ApiError):
            validate_filter(bad, SCHEMA)
    metadata = doc["components"]["schemas"]["Metadata"]
    assert metadata["additionalProperties"] is False and set(metadata["properties"]) == set(SCHEMA)
    add = doc["paths"]["/images"]["post"]
    assert add["security"] == [{"bearer": []}, {"apiKey": []}]
    assert set(add["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    # an app of vectors only offers no uploads
    vectors_only = _doc(dim=4, metadata={}, image_queries=False)
    content = vectors_only["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json"}
    assert "filter" not in content["application/json"]["schema"]["oneOf"][0]["properties"]


def _rewrite_refs(node):
    if isinstance(node, dict):
        return {
            k: v.replace("#/components/schemas/", "#/$defs/") if k == "$ref" else _rewrite_refs(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node
