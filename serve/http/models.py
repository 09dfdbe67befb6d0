"""The request and response bodies of the HTTP API as pydantic models (also the OpenAPI schema).

The ingress reads ``POST /search``'s and ``POST /images``' bodies itself (streamed, with a size
limit: ``serve.http.parse``) and builds the search answer as JSON text itself (it is on every
query's path), so these models *describe* the bodies: FastAPI puts them in the OpenAPI document,
and ``serve.http.openapi`` writes the store-dependent parts out exactly.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from index.query import shaping
from serve.config import MAX_K
from serve.http.validate import DEFAULT_TEXT_WEIGHT


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
    inliers: int | None = Field(
        None,
        description="with verify: local-feature matches one homography explains (null: "
        "not checked: unreadable, or out of the time budget)",
    )
    region: list[float] | None = Field(
        None,
        description="in a store embedded with --regions: the box [x0, y0, x1, y1] (fractions "
        "of the image's width and height) of the part of the image that matched best; absent "
        "when the whole image did",
    )


class MissingShard(BaseModel):
    shard: int
    reason: str = Field(description="'timeout' or 'error: <type>'")


class Verification(BaseModel):
    """What ``verify`` did (``serve.http.verification``)."""

    candidates: int = Field(description="results it was asked to check")
    checked: int | None = Field(None, description="results compared with the query image")
    verified: int | None = Field(None, description="results with at least min_inliers inliers")
    unreadable: int | None = Field(None, description="results whose image may not be read")
    timed_out: int | None = Field(None, description="results left out of time (order kept)")
    min_inliers: int | None = None
    ms: float | None = None
    skipped: str | None = Field(None, description="why nothing was checked (not an image query)")


class SearchResponse(BaseModel):
    results: list[Result]
    took_ms: float
    shards_answered: int
    shards_visited: int = Field(
        description="shards the query was sent to: all, or a routed store's shards_probe nearest"
    )
    shards_total: int
    partial: bool = Field(description="true when some shard did not answer before the deadline")
    missing_shards: list[MissingShard] = Field(default_factory=list)
    verification: Verification | None = Field(
        None, description="with verify: what geometric verification checked"
    )


class Facet(BaseModel):
    """One metadata column among the rows a search could return (``index.query.facets``)."""

    kind: str = Field(description="the column's type: string, int, float or bool")
    values: dict[str, int] | None = Field(
        None, description="string and bool columns: rows per value (strings: the most frequent)"
    )
    other_values: int | None = Field(None, description="strings: distinct values not named")
    other_rows: int | None = Field(None, description="strings: rows holding values not named")
    min: float | None = Field(None, description="numbers: the smallest value")
    max: float | None = Field(None, description="numbers: the largest value")
    rows: int | None = Field(None, description="numbers: rows with a value")
    nulls: int = Field(description="rows without a value")


class FacetsResponse(BaseModel):
    fields: dict[str, Facet]
    shards_answered: int
    shards_total: int
    partial: bool = Field(description="true when some shard could not say (counts leave it out)")
    missing_shards: list[MissingShard] = Field(default_factory=list)


class SearchBody(BaseModel):
    """The JSON form of a query: one of ``vector``, ``id`` or ``text``; ``text`` beside a
    ``vector`` or an ``id`` mixes the two (``text_weight``)."""

    vector: list[float] | None = Field(None, description="query vector, length = catalogue dim")
    id: str | None = Field(None, description="id of a catalogue row: find its neighbours")
    text: str | None = Field(
        None, description="a text query (models with a text tower: CLIP, SigLIP; else 422)"
    )
    text_weight: float | None = Field(
        None,
        description="a mixed query's text share in 0..1: normalize((1-w)*query + w*text) "
        f"(default {DEFAULT_TEXT_WEIGHT})",
    )
    k: int | None = Field(
        None, description=f"results to return, 1..{MAX_K} with the API key (default 10)"
    )
    nprobe: int | None = Field(None, description="IVF lists probed per shard (index default)")
    rerank: bool | None = Field(None, description="exact rerank of candidates (default true)")
    candidates: int | None = Field(None, description="per-shard candidates before rerank")
    shards_probe: int | None = Field(
        None, description="a routed store's shards visited, nearest first (router's default)"
    )
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
    verify: bool | None = Field(
        None, description="image queries: results showing the same object first (local features)"
    )
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
    thumbnail: bool = Field(
        False,
        description="whether the server may read the uri for GET /images/{id}/thumbnail (it is "
        "under the app's thumbnail_roots); false: the uri is stored as the row's name, never read",
    )


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
                        "text": {"type": "string", "minLength": 1},
                        "text_weight": {"type": "number", "minimum": 0, "maximum": 1},
                        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
                        "nprobe": {"type": "integer", "minimum": 1},
                        "rerank": {"type": "boolean"},
                        "candidates": {"type": "integer", "minimum": 1},
                        "shards_probe": {"type": "integer", "minimum": 1},
                        "expand": {"type": "boolean"},
                        "expand_m": {"type": "integer", "minimum": 1},
                        "expand_alpha": {"type": "number", "minimum": 0},
                        "diversify": {"type": ["boolean", "number"]},
                        "dedup": {"type": ["boolean", "number"]},
                        "exclude_self": {"type": "boolean"},
                        "min_score": {"type": "number"},
                        "verify": {"type": "boolean"},
                    },
                }
            },
            "application/json": {"schema": SearchBody.model_json_schema()},
        },
    }
}
