"""The floor of a Python HTTP service: one uvicorn process, no Ray, the same shards and code.

    .venv/bin/python -m harness.floor_server --store /tmp/vs-bench-scale/store-... --port 8123

What ``benchmarks/peers.py`` measures our Serve app against: the same store's shards loaded as the
searcher replicas load them (``index.live.delta.load_live_shard``), searched with the same search,
rerank and merge code (``LiveShard.search``, ``index.query.merge.merge_topk``), behind the same
``POST /search`` contract (``serve.http.parse.parse_search``, the same JSON answer), in a single
uvicorn process: no Serve proxy, no actor calls, no scatter over processes. A search runs in a
worker thread (FAISS releases the GIL), as a FastAPI service would run it. Vector and id queries
only (no image model here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from index.ann.threads import use_threads
from index.ann.transform import load_transform
from index.live.delta import load_live_shard
from index.query.merge import merge_topk
from index.storage.manifest import load_manifest
from index.storage.store import Store
from serve.http.errors import ApiError
from serve.http.limits import Limits
from serve.http.parse import parse_search


def make_app(store_uri: str, threads: int = 1) -> Starlette:
    """The store's shards behind ``POST /search`` and ``GET /healthz``."""
    use_threads(threads)
    store = Store(store_uri)
    manifest = load_manifest(store)
    transform = load_transform(store, manifest)  # the store's space (index.ann.transform)
    shards = [
        load_live_shard(store, s, manifest.shards[s].dir, manifest.dim, manifest.metric, transform)
        for s in range(manifest.num_shards)
    ]
    limits = Limits()

    def search_all(q, params):
        use_threads(threads)  # runs in asyncio's worker threads: OpenMP's count is per thread
        per_shard = [
            s.search(
                q,
                params.k,
                nprobe=params.nprobe,
                candidates=params.candidates,
                rerank=params.rerank,
            )[0]
            for s in shards
        ]
        return merge_topk(per_shard, params.k, manifest.metric)

    async def search(request):
        start = time.perf_counter()
        try:
            query = await parse_search(request, limits, manifest.dim, manifest.metric == "ip")
            if query.kind != "vector":
                raise ApiError(422, "unsupported", "this floor server takes vector queries")
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        merged = await asyncio.to_thread(search_all, query.vector[None, :], query.params)
        body = {
            "results": [
                {"id": h.id, "uri": h.uri, "score": float(h.score), "shard": h.shard}
                for h in merged
            ],
            "took_ms": round((time.perf_counter() - start) * 1000, 3),
            "shards_answered": len(shards),
            "shards_total": len(shards),
            "partial": False,
            "missing_shards": [],
        }
        text = json.dumps(body, separators=(",", ":"))
        return Response(text.encode(), media_type="application/json")

    async def healthz(_request):
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[Route("/search", search, methods=["POST"]), Route("/healthz", healthz)]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads (as a replica's)")
    args = p.parse_args(argv)
    uvicorn.run(
        make_app(args.store, args.threads),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
