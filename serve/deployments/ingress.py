"""The Ingress deployment: the HTTP routes, each a thin handler over the floors below it.

A route reads its request with ``serve.http`` (parse, validate, check who may do what), does its
job through a plain object, and answers:

- ``POST /search``: the query's vector (embedded by the QueryEmbedder, looked up for an ``id``,
  or given), then ``serve.planner.QueryPlanner`` (scatter to the groups it visits, gather by
  ``shard_deadline_ms``, merge, shape; a group late or dead is named in ``missing_shards``,
  ``partial: true``); a sample of full answers goes to the canary (``serve.deployments.canary``).
- ``POST /images``, ``DELETE /images/{id}``: ``serve.writes.RowWriter`` (durable, then
  searchable); ``POST /admin/rebuild``: the Rebuilder deployment. All need the API key.
- ``GET /images/{id}`` (+ ``/thumbnail``): the row from the shard that owns it; a thumbnail
  reads the row's uri only under ``thumbnail_roots`` (``serve.http.thumbnails``).
- ``/healthz``, ``/readyz``, ``/stats``: every group's state, the embedder's and the canary's;
  ``/facets``: what each metadata column holds, for the page's filter controls.

``filter``, ``fields`` and ``metadata`` are checked against the store's metadata schema, which
``serve.catalog.Catalog`` re-reads when a request names a column this replica does not know yet;
the OpenAPI document is exact for the store (``serve.http.openapi``). The ingress holds
DeploymentHandles to the QueryEmbedder, to one ShardSearcher deployment per *group* of shards
(``serve.deployments.searcher``), or, with ``colocate_shards``, searches the groups itself
(``LocalGroup``). It never imports torch: the embedder replica runs the model.
"""

import asyncio
import logging
import os
import time

import numpy as np
from fastapi import Header, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from embedding.config import has_text_tower
from index.ann.routing import load_router
from index.ann.transform import in_store_space, load_transform
from index.query.facets import merge_facets
from index.rows import clock
from index.rows.regions import per_image
from index.rows.sharding import shard_of
from index.storage.manifest import Manifest, load_manifest
from serve.catalog import Catalog
from serve.config import ServeConfig
from serve.deployments.canary import hand_to_canary
from serve.deployments.group_calls import group_of_handle
from serve.deployments.local_group import LocalGroup
from serve.deployments.query_model import QueryModel
from serve.http import openapi
from serve.http.answers import json_response, search_response
from serve.http.errors import (
    ERROR_RESPONSES,
    RECORD_ERROR_RESPONSES,
    THUMBNAIL_RESPONSES,
    WRITE_ERROR_RESPONSES,
    ApiError,
    redact,
)
from serve.http.fastapi_app import create_app
from serve.http.limits import Limits, limits_for
from serve.http.metadata import validate_fields
from serve.http.models import SEARCH_OPENAPI_EXTRA, AddResponse, FacetsResponse, SearchResponse
from serve.http.page import add_page_routes
from serve.http.parse import check_add_metadata, parse_add, parse_search, resolve_metadata
from serve.http.security import authorize_write, is_keyed
from serve.http.thumbnails import Sources, thumbnail_response
from serve.http.validate import validate_id
from serve.http.verification import verify_results
from serve.metrics import RequestMetrics, ingress_metrics, log_requests
from serve.planner import QueryPlanner
from serve.scatter import call_with_deadline, gather_with_deadline
from serve.writes import RowWriter

# Serve's ingress decorator pickles the FastAPI app (and through its routes these methods) when
# the class is decorated: everything the routes use must already be defined above the class, and
# annotations must be real objects (no ``from __future__ import annotations``) for FastAPI.
log = logging.getLogger("ray.serve")
api = create_app()
api.add_middleware(RequestMetrics)  # counts, times and logs every request
add_page_routes(api)  # GET / (the search page) and its static files
# The OpenAPI document depends on the store (dimension, metadata columns), which only the
# Ingress replica knows: it sets the context (``_publish_openapi``), the document builds from it.
openapi.install(api)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        config: ServeConfig,
        embedder: DeploymentHandle | None,
        searchers: list[DeploymentHandle],
        rebuilder: DeploymentHandle | None = None,
        groups: list[list[int]] | None = None,
        canary: DeploymentHandle | None = None,
    ):
        self.config = config
        log_requests(config.access_log)  # the app's access log: the middleware's line
        clock.skew_for(f"ingress-{os.getpid()}", config.clock_skew_ms)  # tests only
        self.store = config.open_store()
        self.rebuilder = rebuilder
        self.canary = canary  # serve.deployments.canary.RecallCanary, or None (fraction 0)
        manifest = load_manifest(self.store)
        if manifest is None:
            raise RuntimeError(f"store {config.store} has no manifest")
        groups = groups or [[s] for s in range(manifest.num_shards)]
        if config.colocate_shards:  # the groups live in this replica: no actor hop per query
            searchers = [LocalGroup(config, shards) for shards in groups]
        else:  # actor tasks, whatever Serve's mode defaults to (group_of_handle: a search's gRPC)
            searchers = [h.options(_by_reference=True) for h in searchers]
        if len(searchers) != len(groups) or sorted(sum(groups, [])) != list(
            range(manifest.num_shards)
        ):
            raise RuntimeError(
                f"{len(searchers)} searchers for groups {groups} of {manifest.num_shards} shards"
            )
        self.groups = groups
        self.group_of = {s: g for g, shards in enumerate(groups) for s in shards}
        self.num_shards = manifest.num_shards
        self.all_shards = list(range(self.num_shards))
        self.dim = manifest.dim
        self.metric = manifest.metric
        if embedder is not None:  # images: actor tasks, whose payloads have no message cap
            embedder = embedder.options(_by_reference=True)
        self.embedder = embedder
        # images cropped as the batch job crops them, texts, mixed queries (query_model)
        self.query_model = QueryModel(embedder, config.embed_deadline_ms / 1000)
        self.searchers = searchers
        self.limits = limits_for(config, keyed=True)
        self.anon_limits = limits_for(config, keyed=False)  # serve.http.limits: lower caps
        self.shard_timeout_s = config.shard_deadline_ms / 1000
        self.embed_timeout_s = config.embed_deadline_ms / 1000
        self.needed_timeout_s = config.needed_shard_deadline_ms / 1000
        # what GET /images/{id}/thumbnail may read: a stored uri grants no access by itself
        self.sources = Sources(config.thumbnail_roots, config.thumbnail_timeout_s)
        self.catalog = Catalog(self.store, manifest, on_change=self._publish_openapi)
        self.router = load_router(self.store, manifest)  # None: a hash-sharded store
        self.transform = load_transform(self.store, manifest)  # queries go reduced (_into_...)
        self.planner = QueryPlanner(
            [
                group_of_handle(h, shards, config.handle_transport)
                for h, shards in zip(searchers, groups, strict=True)
            ],
            self.metric,
            self.shard_timeout_s,
            self.router,
            self.needed_timeout_s,
        )
        self.writer = RowWriter(
            self.store,
            self.catalog,
            lambda shard, *args: self._searcher(shard).add_rows.remote(shard, *args),
            lambda shard, *args: self._searcher(shard).add_tombstones.remote(shard, *args),
            lambda shard, ids: self._searcher(shard).stamp.remote(shard, ids),
            self.needed_timeout_s,
        )
        self._publish_openapi(manifest)

    def _publish_openapi(self, manifest: Manifest) -> None:
        openapi.set_context(
            openapi.OpenApiContext(
                dim=self.dim,
                metric=self.metric,
                num_shards=self.num_shards,
                routed=self.router is not None,
                metadata=dict(manifest.metadata),
                image_queries=self.embedder is not None,
                # the store's model kind has a text tower (open_clip); a tokenizer that cannot
                # load here still answers 422 no_text_encoder, with the reason
                text_queries=self.embedder is not None and has_text_tower(manifest.model),
                api_key=bool(self.config.api_key),
                limits=self.anon_limits,  # what any caller may send (keyed ones: more)
            )
        )

    def _searcher(self, shard: int) -> DeploymentHandle:
        """The handle of the group that serves ``shard``."""
        return self.searchers[self.group_of[shard]]

    def _caller(self, request: Request) -> Limits:
        """Mark the request keyed or anonymous (error bodies read the mark); its limits."""
        request.state.keyed = keyed = is_keyed(request.headers, self.config.api_key)
        return self.limits if keyed else self.anon_limits

    def _shown(self, request: Request, body: dict) -> dict:
        """``body`` for this caller: server-side error text only with the key."""
        return body if request.state.keyed else redact(body)

    # ---- probes -------------------------------------------------------------------------------
    @api.get("/healthz", summary="The ingress process is alive")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="Every shard has a live index loaded and the embedder is up")
    async def readyz(self, request: Request):
        self._caller(request)
        rows = await self._per_shard("ready", {"loaded": False})
        ok_embed, embedder = await self._embedder_info()
        # each shard judges itself now (it serves a version whenever its newest manifest names
        # one), not against the counts this replica read at start-up
        ready = ok_embed and all(
            row.get("ready", row.get("loaded")) and "error" not in row for row in rows
        )
        body = {"ready": ready, "shards": rows, "embedder": embedder if ok_embed else None}
        if not ok_embed:
            body["embedder_error"] = embedder
        return json_response(self._shown(request, body), 200 if ready else 503)

    @api.get("/stats", summary="Per shard: live version, row count, memory")
    async def stats(self, request: Request) -> dict:
        self._caller(request)
        shards = await self._per_shard("stats", {})
        ok_embed, embedder = await self._embedder_info()
        body = {
            "model": self.catalog.manifest.model_tag,
            "dim": self.dim,
            "metric": self.metric,
            "num_shards": self.num_shards,
            # "hash", or "routed": a query visits default_shards_probe shards (index.ann.routing)
            "layout": self.catalog.manifest.layout,
            "default_shards_probe": self.router.default_probe if self.router else self.num_shards,
            "total_count": sum(row.get("count", 0) for row in shards),  # rows: regions too
            "regions": self.catalog.manifest.regions,  # grid levels per image (1: none)
            "rows_per_image": per_image(self.catalog.manifest.regions),
            "memory_bytes": sum(row.get("memory_bytes", 0) for row in shards),
            "shards": shards,
            "embedder": embedder if ok_embed else {"error": embedder},
            "groups": self.groups,
            "canary": await self._canary_stats(),
        }
        return self._shown(request, body)

    @api.get(
        "/facets",
        summary="What each metadata column holds: values and counts, numeric ranges",
        response_model=FacetsResponse,
    )
    async def facets(self, request: Request) -> dict:
        """The search page builds its filter controls from this; counts are over the rows a
        search could return now (``index.query.facets``), merged over the shards that answered."""
        self._caller(request)
        rows = await self._per_shard("facets", {})
        missing = {r["shard"]: r["error"] for r in rows if "error" in r}
        body = {
            "fields": merge_facets(r["fields"] for r in rows if "fields" in r),
            "shards_answered": self.num_shards - len(missing),
            "shards_total": self.num_shards,
            "partial": bool(missing),
            "missing_shards": [{"shard": s, "reason": why} for s, why in sorted(missing.items())],
        }
        return self._shown(request, body)

    async def _canary_stats(self) -> dict | None:
        """The recall canary's window (``serve.deployments.canary``); None when it is off."""
        if self.canary is None:
            return None
        ok, stats = await call_with_deadline(self.canary.stats.remote(), self.shard_timeout_s)
        return stats if ok else {"error": stats}

    async def _per_shard(self, method: str, absent: dict) -> list[dict]:
        """``method`` of every group (a list of per-shard rows each), as one row per shard;
        shards of a group that did not answer get ``absent`` plus the reason."""
        gathered = await gather_with_deadline(
            {g: getattr(h, method).remote for g, h in enumerate(self.searchers)},
            self.shard_timeout_s,
        )
        rows: dict[int, dict] = {}
        for answer in gathered.answers.values():
            rows.update((row["shard"], row) for row in answer)
        for g, reason in gathered.missing.items():
            rows.update((s, {"shard": s, **absent, "error": reason}) for s in self.groups[g])
        return [rows[s] for s in range(self.num_shards)]

    async def _embedder_info(self) -> tuple[bool, dict | str | None]:
        """``(ok, info)``; ``(True, None)`` when the app takes no image queries."""
        if self.embedder is None:
            return True, None
        return await call_with_deadline(self.embedder.info.remote(), self.embed_timeout_s)

    # ---- search -------------------------------------------------------------------------------
    @api.post(
        "/search",
        summary="Nearest catalogue images to an image, a vector, a catalogue id or a text",
        response_model=SearchResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=SEARCH_OPENAPI_EXTRA,
    )
    async def search(
        self,
        request: Request,
        # no declared parameters: parse_search reads the query string and the body by our rules
        # (the OpenAPI parameters are serve.http.openapi's), FastAPI need not validate them too
    ) -> dict:
        start = time.perf_counter()
        limits = self._caller(request)
        query = await parse_search(request, limits, self.dim, self.metric == "ip")
        query = await self.catalog.checked(resolve_metadata, query)
        params = query.params
        vector = None  # a text query's vector is its text's
        if query.kind == "vector":
            vector = query.vector
        elif query.kind == "id":
            vector = await self._vector_of(query.row_id)
        elif query.kind == "image":
            vector = await self.query_model.image(query.image, limits, "send a JSON vector or id")
        if query.text is not None:  # alone, or mixed into the query at text_weight
            vector = await self.query_model.with_text(
                vector, query.text, query.text_weight, self._into_store_space
            )
        vector = in_store_space(vector, self.transform).reshape(-1)  # an id's is there already
        answer = await self.planner.search(
            vector,
            params,
            self.catalog.fields(params.fields),
            keyed=request.state.keyed,
            query_id=query.row_id if query.kind == "id" else None,
        )
        if params.filter is None:  # the canary's exact search knows no filter
            hand_to_canary(
                self.canary,
                self.config.canary_fraction,
                vector,
                params.k,
                answer.pool,
                answer.pool_missing,
            )
        ingress_metrics().observe_answer({m["shard"]: m["reason"] for m in answer.missing})
        results, verification = answer.results(params.k), None
        if params.verify:  # image queries: the same object first (geometric verification)
            results, verification = await verify_results(
                query.image, results, self.sources, limits, self.config.verify_budget_ms / 1000
            )
        took_ms = (time.perf_counter() - start) * 1000
        # a Response, sent as is (``serve.http.answers``); response_model stays for OpenAPI
        return search_response(
            results,
            answer.missing,
            took_ms,
            self.num_shards,
            verification=verification,
            shards_visited=answer.visited,
        )

    async def _by_id(self, row_id: str, method: str, *args):
        """``method(shard, row_id, *args)`` of the shard holding ``row_id``: its hash shard, or
        in a routed store (where an id does not name its shard) every shard, the first answer
        that is not None winning. 503 ``shard_unavailable`` when a shard that may hold it did
        not answer and none found it; None when every shard asked said it has no such row."""
        owners = [shard_of(row_id, self.num_shards)] if self.router is None else self.all_shards
        # every shard asked may be the owner, so each gets the needed deadline: a busy owner is
        # waited for, not cut at the scatter deadline because another shard said "not here"
        gathered = await gather_with_deadline(
            {
                s: (lambda s=s: getattr(self._searcher(s), method).remote(s, row_id, *args))
                for s in owners
            },
            self.needed_timeout_s,
        )
        found = [answer for _, answer in sorted(gathered.answers.items()) if answer is not None]
        if found:
            return found[0]
        if gathered.missing:
            which = "owner of the id" if len(owners) == 1 else "one that may hold the id"
            shard = min(gathered.missing)
            raise ApiError(503, "shard_unavailable", f"shard {shard} ({which}) did not answer")
        return None

    async def _into_store_space(self, vector: np.ndarray) -> np.ndarray:
        """``vector`` (the model's space) through the store's transform (``index.ann.transform``),
        to mix with an id's vector. Queries go to the shards reduced (10x fewer floats at 128-d);
        if the store learned one after this replica started, its shards reduce queries."""
        transform = self.transform
        if transform is None:  # learned since this replica started (the store's first build)
            manifest = await asyncio.to_thread(load_manifest, self.store)
            transform = None if manifest is None else load_transform(self.store, manifest)
        if transform is None:
            raise ApiError(422, "invalid_parameter", "the id's and the text's vectors differ")
        return in_store_space(vector, transform).reshape(-1)

    async def _vector_of(self, row_id: str) -> np.ndarray:
        """The vector of the catalogue row ``row_id`` (an ``id`` query), from its shard."""
        vector = await self._by_id(row_id, "vector_of")
        if vector is None:
            raise ApiError(404, "unknown_id", f"no catalogue row has id {row_id!r}")
        return np.asarray(vector, dtype=np.float32)

    # ---- catalogue rows (the search page's thumbnails) -----------------------------------------
    @api.get(
        "/images/{image_id}",
        summary="A catalogue row: id, uri, shard, metadata",
        responses=RECORD_ERROR_RESPONSES,
    )
    async def get_image(self, image_id: str, fields: str | None = None) -> dict:
        """``fields``: comma-separated metadata columns to return (default all, ``""`` none)."""
        names = await self.catalog.checked(validate_fields, fields)
        return await self._record(image_id, names)

    @api.get(
        "/images/{image_id}/thumbnail",
        summary="A small JPEG of a catalogue row whose uri is under thumbnail_roots",
        response_class=Response,
        responses=THUMBNAIL_RESPONSES,
    )
    async def get_thumbnail(
        self,
        image_id: str,
        if_none_match: str | None = Header(
            None, description="ETags of a copy the caller has: 304 when one is current"
        ),
    ) -> Response:
        record = await self._record(image_id)
        # anonymous limits for everyone: the route is anonymous and the cache is shared
        return await thumbnail_response(record, if_none_match, self.sources, self.anon_limits)

    async def _record(self, image_id: str, fields: tuple[str, ...] | None = None) -> dict:
        """The visible row ``image_id`` from the shard that owns it, with the metadata
        ``fields`` (None: all); 404 ``unknown_id``."""
        row_id = validate_id(image_id)
        record = await self._by_id(row_id, "record", fields)
        if record is None:
            raise ApiError(404, "unknown_id", f"no catalogue row has id {row_id!r}")
        return record

    # ---- writes -------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> Limits:
        """Refuse writes and admin calls this caller may not make (``serve.http.security``)."""
        limits = self._caller(request)
        authorize_write(request.headers, self.config)
        return limits

    @api.post(
        "/images",
        status_code=201,
        summary="Add an image (durable and searchable when this returns)",
        response_model=AddResponse,
        responses=WRITE_ERROR_RESPONSES,
    )
    async def add_image(self, request: Request) -> dict:
        limits = self._authorize(request)
        add = await parse_add(request, limits, self.dim, self.metric == "ip")
        add = await self.catalog.checked(check_add_metadata, add)
        if add.kind == "image":
            vector = await self.query_model.image(add.image, limits, "send a JSON vector")
        else:
            vector = add.vector
        body = await self.writer.add(add, vector)
        # any uri is stored (it names the row); only one under thumbnail_roots is ever read
        body["thumbnail"] = self.sources.allows(body["uri"])
        return body

    @api.delete(
        "/images/{image_id}",
        summary="Delete an image (durable and hidden when this returns)",
        responses=WRITE_ERROR_RESPONSES,
    )
    async def delete_image(self, request: Request, image_id: str) -> dict:
        self._authorize(request)
        return await self.writer.delete(validate_id(image_id))

    @api.post(
        "/admin/rebuild",
        status_code=202,
        summary="Rebuild shards now (a Ray task per shard; searchers swap when it commits)",
        responses=WRITE_ERROR_RESPONSES,
    )
    async def rebuild(
        self,
        request: Request,
        shard: int | None = None,
        force: bool = False,
        retrain: bool = False,
    ):
        """``force``: rebuild shards that are up to date too; ``retrain``: never reuse the
        live version's trained quantizer. Both off by default: a rebuild folds in the delta."""
        self._authorize(request)
        if self.rebuilder is None:
            raise ApiError(501, "rebuilds_disabled", "this app runs no Rebuilder")
        if shard is not None and not 0 <= shard < self.num_shards:
            raise ApiError(422, "invalid_parameter", f"shard must be in 0..{self.num_shards - 1}")
        shards = None if shard is None else [shard]
        return await self.rebuilder.request.remote(shards, force, retrain)

    @api.get("/admin/rebuild", summary="Running, queued and recent rebuilds")
    async def rebuild_status(self, request: Request):
        self._authorize(request)
        if self.rebuilder is None:
            raise ApiError(501, "rebuilds_disabled", "this app runs no Rebuilder")
        return await self.rebuilder.status.remote()
