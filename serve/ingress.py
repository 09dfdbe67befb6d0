"""The HTTP ingress: parse and validate, embed, scatter to every shard, gather, merge, answer.

The ingress holds DeploymentHandles to the QueryEmbedder and to one ShardSearcher deployment per
shard. Each shard call gets the same deadline (``shard_deadline_ms``); a shard that misses it or
whose replica died is left out and the answer says ``partial: true``. The merge of per-shard
top-k lists is ``index.merge.merge_topk``, the same one the in-process search uses.
"""

import asyncio
import time

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from index.hits import Hit
from index.manifest import load_manifest
from index.merge import merge_topk
from index.sharding import shard_of
from index.store import Store
from serve.api import (
    ERROR_RESPONSES,
    SEARCH_OPENAPI_EXTRA,
    ApiError,
    Limits,
    ParsedQuery,
    SearchResponse,
    create_app,
    image_crop,
    parse_search,
)
from serve.config import ServeConfig
from serve.scatter import call_with_deadline, gather_with_deadline

# Serve's ingress decorator pickles the FastAPI app (and through its routes these methods) when
# the class is decorated: everything the routes use must already be defined above the class, and
# annotations must be real objects (no ``from __future__ import annotations``) for FastAPI.
api = create_app()


def _missing(missing: dict[int, str]) -> list[dict]:
    return [{"shard": s, "reason": r} for s, r in sorted(missing.items())]


def _json(body: dict, status: int) -> JSONResponse:
    return JSONResponse(body, status_code=status)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        config: ServeConfig,
        embedder: DeploymentHandle | None,
        searchers: list[DeploymentHandle],
    ):
        self.config = config
        manifest = load_manifest(Store(config.store))
        if manifest is None:
            raise RuntimeError(f"store {config.store} has no manifest")
        if len(searchers) != manifest.num_shards:
            raise RuntimeError(f"{len(searchers)} searchers for {manifest.num_shards} shards")
        self.manifest = manifest
        self.dim = manifest.dim
        self.metric = manifest.metric
        self.num_shards = manifest.num_shards
        if config.handle_transport == "grpc":
            embedder = embedder.options(_by_reference=False) if embedder is not None else None
            searchers = [h.options(_by_reference=False) for h in searchers]
        self.embedder = embedder
        self.searchers = searchers
        self.limits = Limits(
            default_k=config.default_k,
            default_nprobe=config.default_nprobe,
            default_candidates=config.default_candidates,
            max_nprobe=config.max_nprobe,
            max_candidates=config.max_candidates,
            max_upload_bytes=config.max_upload_bytes,
            max_pixels=config.max_pixels,
        )
        self.shard_timeout_s = config.shard_deadline_ms / 1000
        self.embed_timeout_s = config.embed_deadline_ms / 1000
        self._image_size: int | None = None

    # ---- probes -------------------------------------------------------------------------------
    @api.get("/healthz", summary="The ingress process is alive")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="Every shard has a live index loaded and the embedder is up")
    async def readyz(self):
        shards = await gather_with_deadline(
            {s: h.ready.remote for s, h in enumerate(self.searchers)}, self.shard_timeout_s
        )
        ok_embed, embedder = await self._embedder_info()
        rows = [
            shards.answers.get(s) or {"shard": s, "loaded": False, "error": shards.missing[s]}
            for s in range(self.num_shards)
        ]
        expected = {s: st.count for s, st in self.manifest.shards.items()}
        ready = ok_embed and all(
            row.get("loaded") or (expected.get(row["shard"]) == 0 and "error" not in row)
            for row in rows
        )
        body = {"ready": ready, "shards": rows, "embedder": embedder if ok_embed else None}
        if not ok_embed:
            body["embedder_error"] = embedder
        return _json(body, 200 if ready else 503)

    @api.get("/stats", summary="Per shard: live version, row count, memory")
    async def stats(self) -> dict:
        gathered = await gather_with_deadline(
            {s: h.stats.remote for s, h in enumerate(self.searchers)}, self.shard_timeout_s
        )
        ok_embed, embedder = await self._embedder_info()
        shards = [
            gathered.answers.get(s) or {"shard": s, "error": gathered.missing[s]}
            for s in range(self.num_shards)
        ]
        return {
            "model": self.manifest.model_tag,
            "dim": self.dim,
            "metric": self.metric,
            "num_shards": self.num_shards,
            "total_count": sum(row.get("count", 0) for row in shards),
            "memory_bytes": sum(row.get("memory_bytes", 0) for row in shards),
            "shards": shards,
            "embedder": embedder if ok_embed else {"error": embedder},
        }

    # ---- search -------------------------------------------------------------------------------
    @api.post(
        "/search",
        summary="Nearest catalogue images to an image, a vector or a catalogue id",
        response_model=SearchResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=SEARCH_OPENAPI_EXTRA,
    )
    async def search(
        self,
        request: Request,
        k: int | None = None,
        nprobe: int | None = None,
        rerank: bool | None = None,
        candidates: int | None = None,
        id: str | None = None,
    ) -> dict:
        start = time.perf_counter()
        query = await parse_search(request, self.limits, self.dim, self.metric == "ip")
        vector = await self._query_vector(query)
        params = query.params
        gathered = await gather_with_deadline(
            {
                s: (
                    lambda h=h: h.search.remote(
                        vector, params.k, params.nprobe, params.candidates, params.rerank
                    )
                )
                for s, h in enumerate(self.searchers)
            },
            self.shard_timeout_s,
        )
        if not gathered.answers:
            raise ApiError(
                503,
                "no_shard_answered",
                f"none of {self.num_shards} shards answered within "
                f"{self.config.shard_deadline_ms:.0f} ms",
                {"missing_shards": _missing(gathered.missing)},
            )
        per_shard = [
            [
                Hit(i, u, score, shard)
                for i, u, score in zip(answer["ids"], answer["uris"], answer["scores"], strict=True)
            ]
            for shard, answer in sorted(gathered.answers.items())
        ]
        merged = merge_topk(per_shard, params.k, self.metric)
        return {
            "results": [
                {"id": h.id, "uri": h.uri, "score": float(h.score), "shard": h.shard}
                for h in merged
            ],
            "took_ms": round((time.perf_counter() - start) * 1000, 3),
            "shards_answered": len(gathered.answers),
            "shards_total": self.num_shards,
            "partial": bool(gathered.missing),
            "missing_shards": _missing(gathered.missing),
        }

    async def _query_vector(self, query: ParsedQuery) -> np.ndarray:
        if query.kind == "vector":
            return query.vector
        if query.kind == "id":
            shard = shard_of(query.row_id, self.num_shards)
            ok, vector = await call_with_deadline(
                self.searchers[shard].vector_of.remote(query.row_id), self.shard_timeout_s
            )
            if not ok:
                raise ApiError(
                    503, "shard_unavailable", f"shard {shard} (owner of the id) did not answer"
                )
            if vector is None:
                raise ApiError(404, "unknown_id", f"no catalogue row has id {query.row_id!r}")
            return np.asarray(vector, dtype=np.float32)
        if self.embedder is None:
            raise ApiError(
                501,
                "image_queries_disabled",
                "this app serves vectors that no image model made (image_queries: false); "
                "send a JSON vector or id",
            )
        image_size = await self._embedder_image_size()
        crop = await asyncio.to_thread(image_crop, query.image, image_size, self.limits)
        ok, vector = await call_with_deadline(
            self.embedder.embed.remote(crop), self.embed_timeout_s
        )
        if not ok:
            raise ApiError(503, "embedder_unavailable", f"the query embedder failed: {vector}")
        return vector

    async def _embedder_info(self) -> tuple[bool, dict | str | None]:
        """``(ok, info)``; ``(True, None)`` when the app takes no image queries."""
        if self.embedder is None:
            return True, None
        return await call_with_deadline(self.embedder.info.remote(), self.embed_timeout_s)

    async def _embedder_image_size(self) -> int:
        if self._image_size is None:
            ok, info = await call_with_deadline(self.embedder.info.remote(), self.embed_timeout_s)
            if not ok:
                raise ApiError(503, "embedder_unavailable", f"the query embedder failed: {info}")
            self._image_size = int(info["image_size"])
        return self._image_size
