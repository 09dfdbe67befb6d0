"""The bodies the ingress answers with: JSON, and the search answer encoded once.

A search answer is built from ``str``/``int``/``float``/``bool``/``None`` only (metadata values
too), so it matches ``serve.http.models.SearchResponse`` as it is. It is sent as JSON text
encoded here, once: FastAPI would validate a returned dict against the response model and encode
it again, and that pass cost more than the merge.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse, Response


def json_response(body: dict, status: int) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def search_response(
    results: list[dict],
    missing: list[dict],
    took_ms: float,
    shards_total: int,
    verification: dict | None = None,
    shards_visited: int | None = None,
) -> Response:
    """``SearchResponse`` as JSON text (as JSONResponse would encode it: compact, UTF-8).
    ``shards_visited``: the shards a routed store's query was sent to (default all)."""
    visited = shards_total if shards_visited is None else shards_visited
    body = {
        "results": results,
        "took_ms": round(took_ms, 3),
        "shards_answered": visited - len(missing),
        "shards_visited": visited,
        "shards_total": shards_total,
        "partial": bool(missing),
        "missing_shards": missing,
    }
    if verification is not None:
        body["verification"] = verification
    text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(text.encode(), media_type="application/json")
