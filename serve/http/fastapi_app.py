"""The FastAPI app of the HTTP API, before any route: its description and its error handlers.

The routes are the ingress deployment's methods (``serve.deployments.ingress``: Serve binds a
FastAPI app's routes to a deployment class with ``serve.ingress``); the page (``serve.http.page``)
and the exact OpenAPI document (``serve.http.openapi.install``) are added there too. Tests build
apps of their own on this one to check the error model without Serve.
"""

from __future__ import annotations

from fastapi import FastAPI

from serve.http.errors import add_error_handlers


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
    add_error_handlers(app)
    return app
