"""The HTTP ingress: parse and validate, embed, scatter to every shard, gather, merge, answer.

The ingress holds DeploymentHandles to the QueryEmbedder and to one ShardSearcher deployment per
*group* of shards (``serve.searcher``: a replica searches all shards of its group in one call and
merges them). Each group call gets the same deadline (``shard_deadline_ms``); a group that misses
it or whose replica died is left out, its shards are named in ``missing_shards`` and the answer
says ``partial: true``. The merge of the groups' top-k lists is ``index.query.merge.merge_topk``,
the
same one the groups and the in-process search use.

Metadata (issue #13): ``filter`` and ``fields`` of a search are checked against the store's
metadata schema here (``serve.api.resolve_metadata``) and the parsed filter is sent to every
shard, which evaluates it on its own columns; results carry the ``fields`` asked (default all).
``POST /images`` checks its ``metadata`` against the schema and writes it as typed columns. The
schema is the manifest's, re-read (at most once a second) when a request names a column this
replica does not know yet, since a batch run may have added one. The OpenAPI document is exact
for the store (``serve.openapi``).

Writes (issue #5): ``POST /images`` embeds the image (or takes a vector), writes the row as a
new Parquet part of its shard (``index.live.delta.write_rows``: atomic, fsynced) and then hands it
to that shard's searcher, so the 201 means durable *and* searchable; ``DELETE /images/{id}``
does the same with a tombstone. Other replicas of the shard see the write within
``delta_poll_s``. ``POST /admin/rebuild`` asks the Rebuilder deployment for rebuilds.
"""

import asyncio
import json
import logging
import random
import time

import numpy as np
import pyarrow as pa
from fastapi import Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from index.live.delta import write_rows, write_tombstones
from index.query.hits import Hit
from index.query.merge import merge_topk
from index.query.shaping import POOL_FACTOR, expanded_query, self_ids_of
from index.query.shaping import shape as shape_hits
from index.rows import clock, schema
from index.rows.metadata import record_columns
from index.rows.sharding import content_id, shard_of, uri_id
from index.storage.manifest import load_manifest
from serve.api import (
    ERROR_RESPONSES,
    SEARCH_OPENAPI_EXTRA,
    WRITE_ERROR_RESPONSES,
    AddResponse,
    ApiError,
    Limits,
    ParsedQuery,
    SearchParams,
    SearchResponse,
    check_add_metadata,
    create_app,
    image_crop,
    parse_add,
    parse_search,
    resolve_metadata,
    validate_fields,
    validate_id,
)
from serve.config import MAX_K, ServeConfig
from serve.metrics import RequestMetrics, ingress_metrics
from serve.openapi import OpenApiContext, app_document, set_context
from serve.page import add_page_routes
from serve.scatter import call_with_deadline, gather_with_deadline
from serve.searcher import LocalGroup
from serve.security import authorize_write, is_keyed, limits_for, redact
from serve.thumbnails import RECORD_ERROR_RESPONSES, thumbnail_response

# Serve's ingress decorator pickles the FastAPI app (and through its routes these methods) when
# the class is decorated: everything the routes use must already be defined above the class, and
# annotations must be real objects (no ``from __future__ import annotations``) for FastAPI.
log = logging.getLogger("ray.serve")
api = create_app()
api.add_middleware(RequestMetrics)  # counts, times and logs every request
add_page_routes(api)  # GET / (the search page) and its static files

# The OpenAPI document depends on the store (dimension, metadata columns), which only the
# Ingress replica knows: it sets the context, ``serve.openapi.app_document`` builds from it.
api.openapi = app_document
SCHEMA_RELOAD_S = 1.0  # at most one manifest read a second for requests naming unknown columns


def _missing(missing: dict[int, str], groups: list[list[int]], keyed: bool = True) -> list[dict]:
    """Per-shard entries for the groups that did not answer (reasons redacted when anonymous)."""
    rows = [{"shard": s, "reason": r} for g, r in sorted(missing.items()) for s in groups[g]]
    return rows if keyed else redact(rows)


def _json(body: dict, status: int) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _search_json(body: dict) -> Response:
    """The search answer as JSON text, encoded once (as JSONResponse would: compact, UTF-8)."""
    text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(text.encode(), media_type="application/json")


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
        self.store = config.open_store()
        self.rebuilder = rebuilder
        self.canary = canary  # serve.canary.RecallCanary, or None (canary_fraction 0)
        manifest = load_manifest(self.store)
        if manifest is None:
            raise RuntimeError(f"store {config.store} has no manifest")
        groups = groups or [[s] for s in range(manifest.num_shards)]
        if config.colocate_shards:  # the groups live in this replica: no actor hop per query
            searchers = [LocalGroup(config, shards) for shards in groups]
        elif config.handle_transport == "grpc":
            searchers = [h.options(_by_reference=False) for h in searchers]
        if len(searchers) != len(groups) or sorted(sum(groups, [])) != list(
            range(manifest.num_shards)
        ):
            raise RuntimeError(
                f"{len(searchers)} searchers for groups {groups} of {manifest.num_shards} shards"
            )
        self.groups = groups
        self.group_of = {s: g for g, shards in enumerate(groups) for s in shards}
        self.manifest = manifest
        self.dim = manifest.dim
        self.metric = manifest.metric
        self.num_shards = manifest.num_shards
        if config.handle_transport == "grpc" and embedder is not None:
            embedder = embedder.options(_by_reference=False)
        self.embedder = embedder
        self.searchers = searchers
        self.limits = limits_for(config, keyed=True)
        self.anon_limits = limits_for(config, keyed=False)  # serve.security: lower caps
        self.shard_timeout_s = config.shard_deadline_ms / 1000
        self.embed_timeout_s = config.embed_deadline_ms / 1000
        self._image_size: int | None = None
        self._schema_read_at = time.monotonic()
        self._publish_openapi()

    # ---- the metadata schema ------------------------------------------------------------------
    def _publish_openapi(self) -> None:
        set_context(
            OpenApiContext(
                dim=self.dim,
                metric=self.metric,
                metadata=dict(self.manifest.metadata),
                image_queries=self.embedder is not None,
                api_key=bool(self.config.api_key),
                limits=self.anon_limits,  # what any caller may send (keyed ones: more)
            )
        )

    async def _with_schema(self, check, value):
        """``check(value, schema)`` with the store's metadata schema; when it refuses a column
        this replica has not seen, re-read the manifest (rate-limited) and check once more."""
        try:
            return check(value, self.manifest.metadata)
        except ApiError as e:
            if e.error not in ("unknown_field", "invalid_metadata") or not await self._reread():
                raise
        return check(value, self.manifest.metadata)

    async def _reread(self) -> bool:
        """Re-read the manifest if the last read is over ``SCHEMA_RELOAD_S`` old; True when the
        metadata schema changed."""
        if time.monotonic() - self._schema_read_at < SCHEMA_RELOAD_S:
            return False
        self._schema_read_at = time.monotonic()
        manifest = await asyncio.to_thread(load_manifest, self.store)
        if manifest is None or manifest.metadata == self.manifest.metadata:
            return False
        self.manifest = manifest
        self._publish_openapi()
        return True

    # ---- probes -------------------------------------------------------------------------------
    @api.get("/healthz", summary="The ingress process is alive")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    def _caller(self, request: Request) -> Limits:
        """Mark the request keyed or anonymous (error bodies read the mark); its limits."""
        request.state.keyed = keyed = is_keyed(request.headers, self.config.api_key)
        return self.limits if keyed else self.anon_limits

    def _shown(self, request: Request, body: dict) -> dict:
        """``body`` for this caller: server-side error text only with the key."""
        return body if request.state.keyed else redact(body)

    @api.get("/readyz", summary="Every shard has a live index loaded and the embedder is up")
    async def readyz(self, request: Request):
        self._caller(request)
        rows = await self._per_shard("ready", {"loaded": False})
        ok_embed, embedder = await self._embedder_info()
        expected = {s: st.count for s, st in self.manifest.shards.items()}
        ready = ok_embed and all(
            row.get("loaded") or (expected.get(row["shard"]) == 0 and "error" not in row)
            for row in rows
        )
        body = {"ready": ready, "shards": rows, "embedder": embedder if ok_embed else None}
        if not ok_embed:
            body["embedder_error"] = embedder
        return _json(self._shown(request, body), 200 if ready else 503)

    @api.get("/stats", summary="Per shard: live version, row count, memory")
    async def stats(self, request: Request) -> dict:
        self._caller(request)
        shards = await self._per_shard("stats", {})
        ok_embed, embedder = await self._embedder_info()
        body = {
            "model": self.manifest.model_tag,
            "dim": self.dim,
            "metric": self.metric,
            "num_shards": self.num_shards,
            "total_count": sum(row.get("count", 0) for row in shards),
            "memory_bytes": sum(row.get("memory_bytes", 0) for row in shards),
            "shards": shards,
            "embedder": embedder if ok_embed else {"error": embedder},
            "groups": self.groups,
            "canary": await self._canary_stats(),
        }
        return self._shown(request, body)

    async def _canary_stats(self) -> dict | None:
        """The recall canary's window (``serve.canary``); None when it is off."""
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
        fields: str | None = None,
        # still read (``?id=``), but not documented: it is the JSON body's ``id``
        id: str | None = Query(None, include_in_schema=False),
    ) -> dict:
        start = time.perf_counter()
        limits = self._caller(request)
        query = await parse_search(request, limits, self.dim, self.metric == "ip")
        query = await self._with_schema(resolve_metadata, query)
        vector = await self._query_vector(query, limits)
        params = query.params
        shape = params.shape
        fetch = shape.fetch_k(params.k, MAX_K)  # = k unless shaping needs more to choose from
        merged, missing = await self._gather_hits(vector, fetch, params, request.state.keyed)
        if params.filter is None:  # the canary's exact search knows no filter
            self._canary_sample(vector, params.k, merged, missing)
        shaped = None
        if shape.active:
            merged, shaped, again = await self._shape(
                query, vector, merged, fetch, params, request.state.keyed
            )
            missing += [m for m in again if m not in missing]  # the expanded query's scatter
        ingress_metrics().observe_answer({m["shard"]: m["reason"] for m in missing})
        results = [
            {
                "id": h.id,
                "uri": h.uri,
                "score": float(h.score),
                "shard": h.shard,
                "metadata": h.metadata or {},
            }
            for h in merged[: params.k]
        ]
        if shaped is not None and shape.dedup is not None:
            for row, item in zip(results, shaped, strict=True):
                row["collapsed"] = list(item.collapsed)
        body = {
            "results": results,
            "took_ms": round((time.perf_counter() - start) * 1000, 3),
            "shards_answered": self.num_shards - len(missing),
            "shards_total": self.num_shards,
            "partial": bool(missing),
            "missing_shards": missing,
        }
        # A Response is sent as is: FastAPI validates and re-encodes a returned dict against
        # response_model (which stays, for the OpenAPI schema), and that pass cost more than
        # the merge. The body is built from str/int/float/bool/None only (metadata values too),
        # so it matches the model.
        return _search_json(body)

    async def _gather_hits(
        self, vector: np.ndarray, k: int, params: SearchParams, keyed: bool = True
    ) -> tuple[list[Hit], list[dict]]:
        """Scatter one query to every group, gather before the deadline, merge the top ``k``;
        returns the hits and the shards that did not answer (503 when none did; the reasons
        redacted for an anonymous caller). The filter and the metadata fields of ``params`` go
        to every group (each shard evaluates the filter on its own columns)."""
        names = tuple(self.manifest.metadata) if params.fields is None else params.fields
        gathered = await gather_with_deadline(
            {
                g: (
                    lambda h=h: h.search.remote(
                        vector,
                        k,
                        params.nprobe,
                        params.candidates,
                        params.rerank,
                        params.filter,
                        names,
                    )
                )
                for g, h in enumerate(self.searchers)
            },
            self.shard_timeout_s,
        )
        missing = _missing(gathered.missing, self.groups, keyed)
        if not gathered.answers:
            raise ApiError(
                503,
                "no_shard_answered",
                f"none of {self.num_shards} shards answered within "
                f"{self.config.shard_deadline_ms:.0f} ms",
                {"missing_shards": missing},
            )
        per_group = [
            [
                Hit(i, u, score, shard, metadata)
                for i, u, score, shard, metadata in zip(
                    answer["ids"],
                    answer["uris"],
                    answer["scores"],
                    answer["shards"],
                    answer.get("metadata") or [None] * len(answer["ids"]),
                    strict=True,
                )
            ]
            for _, answer in sorted(gathered.answers.items())
        ]
        return merge_topk(per_group, k, self.metric), missing

    # ---- answer shaping and the recall canary (issue #17) --------------------------------------
    async def _shape(
        self, query: ParsedQuery, vector, hits: list[Hit], fetch: int, params, keyed: bool
    ):
        """Query expansion (a second scatter with the expanded query), then ``index.query.shaping``.
        When dedup collapses the pool into fewer than ``k`` groups, the pool grows (x4, up to
        ``MAX_K``) and is shaped again. Returns the shaped hits, their ``Shaped`` records (for
        ``collapsed``) and the shards the extra scatters missed."""
        shape = params.shape
        missing: list[dict] = []
        self_ids = None
        if shape.exclude_self:  # before expansion moves the query off its own vector
            self_ids = {query.row_id} if query.kind == "id" else self_ids_of(hits, self.metric)
        if shape.expand and hits:
            top = hits[: shape.expand_m]
            found = await self._vectors_of(top)
            kept = [h for h in top if h.id in found]
            if kept:
                expanded = expanded_query(
                    vector,
                    np.stack([found[h.id] for h in kept]),
                    [h.score for h in kept],
                    shape.expand_alpha,
                    self.metric,
                )
                hits, missing = await self._gather_hits(expanded, fetch, params, keyed)
                vector = expanded
        known: dict[str, np.ndarray] = {}
        while True:
            if shape.needs_vectors:
                known |= await self._vectors_of([h for h in hits if h.id not in known])
            shaped = shape_hits(
                hits, params.k, shape, self.metric, vectors=known, self_ids=self_ids
            )
            if shape.dedup is None or len(shaped) >= params.k or len(hits) < fetch:
                break
            if fetch >= MAX_K:
                break  # as many as the contract allows: fewer than k groups exist in reach
            # the pool collapsed below k near-duplicate groups: search again with a larger one
            fetch = min(MAX_K, fetch * POOL_FACTOR)
            hits, more = await self._gather_hits(vector, fetch, params, keyed)
            missing += [m for m in more if m not in missing]
        return [item.hit for item in shaped], shaped, missing

    async def _vectors_of(self, hits: list[Hit]) -> dict[str, np.ndarray]:
        """id -> vector of ``hits``, one call per group holding any (rows gone are left out)."""
        by_group: dict[int, list[tuple[int, str]]] = {}
        for h in hits:
            by_group.setdefault(self.group_of[h.shard], []).append((h.shard, h.id))
        gathered = await gather_with_deadline(
            {g: (lambda g=g: self.searchers[g].vectors_of.remote(by_group[g])) for g in by_group},
            self.shard_timeout_s,
        )
        out: dict[str, np.ndarray] = {}
        for g, vectors in gathered.answers.items():
            for (_, row_id), vector in zip(by_group[g], vectors, strict=True):
                if vector is not None:
                    out[row_id] = np.asarray(vector, np.float32)
        return out

    def _canary_sample(self, vector, k: int, hits: list[Hit], missing: list[dict]) -> None:
        """Hand a sampled, fully answered search to the recall canary; never waits for it."""
        if self.canary is None or missing or random.random() >= self.config.canary_fraction:
            return
        try:
            self.canary.observe.remote(vector, k, [h.id for h in hits[:k]])
        except Exception:  # the canary must never fail a search
            log.exception("handing a sample to the recall canary failed")

    # ---- catalogue rows (the search page's thumbnails) -----------------------------------------
    @api.get(
        "/images/{image_id}",
        summary="A catalogue row: id, uri, shard, metadata",
        responses=RECORD_ERROR_RESPONSES,
    )
    async def get_image(self, image_id: str, fields: str | None = None) -> dict:
        """``fields``: comma-separated metadata columns to return (default all, ``""`` none)."""
        names = await self._with_schema(validate_fields, fields)
        return await self._record(image_id, names)

    @api.get(
        "/images/{image_id}/thumbnail",
        summary="A small JPEG of a catalogue row (never an arbitrary path)",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **RECORD_ERROR_RESPONSES},
    )
    async def get_thumbnail(self, request: Request, image_id: str) -> Response:
        record = await self._record(image_id)
        return await thumbnail_response(record, request.headers.get("if-none-match"), self.limits)

    async def _record(self, image_id: str, fields: tuple[str, ...] | None = None) -> dict:
        """The visible row ``image_id`` from the shard that owns it, with the metadata
        ``fields`` (None: all); 404 ``unknown_id``."""
        row_id = validate_id(image_id)
        shard = shard_of(row_id, self.num_shards)
        ok, record = await call_with_deadline(
            self._searcher(shard).record.remote(shard, row_id, fields), self.shard_timeout_s
        )
        if not ok:
            raise ApiError(
                503, "shard_unavailable", f"shard {shard} (owner of the id) did not answer"
            )
        if record is None:
            raise ApiError(404, "unknown_id", f"no catalogue row has id {row_id!r}")
        return record

    # ---- writes -------------------------------------------------------------------------------
    def _searcher(self, shard: int) -> DeploymentHandle:
        """The handle of the group that serves ``shard``."""
        return self.searchers[self.group_of[shard]]

    def _authorize(self, request: Request) -> Limits:
        """Refuse writes and admin calls this caller may not make (``serve.security``)."""
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
        add = await self._with_schema(check_add_metadata, add)
        if add.kind == "image":
            vector = await self._embed_image(add.image, limits)
            content = add.image
        else:
            vector = add.vector
            content = np.asarray(vector, np.float32).tobytes()
        row_id, uri = self._identify(add.row_id, add.uri, content)
        shard = shard_of(row_id, self.num_shards)
        ms = clock.now_ms()
        # every column of the schema, typed (null where not given), as the batch job writes them
        columns = record_columns([add.metadata or {}], self.manifest.metadata)
        extra = {name: columns[name].combine_chunks() for name in columns.column_names}
        vectors = np.asarray(vector, np.float32).reshape(1, -1)
        table = schema.embeddings_table(
            [row_id], [uri], vectors, ingested_at=pa.scalar(ms, schema.TIMESTAMP), extra=extra
        )
        part = await asyncio.to_thread(write_rows, self.store, shard, table)
        metadata = columns.to_pydict() if columns.num_columns else None
        ok, answer = await call_with_deadline(
            self._searcher(shard).add_rows.remote(
                shard, part, [row_id], [uri], vectors, [ms], metadata
            ),
            self.shard_timeout_s,
        )
        return {
            "id": row_id,
            "uri": uri,
            "shard": shard,
            "part": part,
            "ingested_at_ms": ms,
            # false: durable, but the shard did not answer in time; every replica of the shard
            # reads the part on its next store poll (delta_poll_s)
            "searchable": bool(ok and answer.get("applied")),
            "metadata": add.metadata or {},
        }

    def _identify(self, row_id: str | None, uri: str | None, content: bytes) -> tuple[str, str]:
        """(id, uri) of a new row by the store's id scheme (``Manifest.id_scheme``), the way the
        embedding job names rows, so adding a catalogue image again never duplicates it:
        ``uri`` scheme: the hash of the URI (an upload without one is ``upload:<content hash>``);
        ``content`` scheme: the hash of the bytes. An explicit ``id`` wins (catalogue keys)."""
        if row_id is not None:  # a catalogue key given by the client
            return row_id, uri or f"upload:{row_id}"
        if self.manifest.id_scheme == "content":
            row_id = content_id(content)
            return row_id, uri or f"upload:{row_id}"
        uri = uri or f"upload:{content_id(content)}"
        return uri_id(uri), uri

    @api.delete(
        "/images/{image_id}",
        summary="Delete an image (durable and hidden when this returns)",
        responses=WRITE_ERROR_RESPONSES,
    )
    async def delete_image(self, request: Request, image_id: str) -> dict:
        self._authorize(request)
        row_id = validate_id(image_id)
        shard = shard_of(row_id, self.num_shards)
        ms = clock.now_ms()
        part, ms = await asyncio.to_thread(write_tombstones, self.store, shard, [row_id], ms)
        ok, answer = await call_with_deadline(
            self._searcher(shard).add_tombstones.remote(shard, part, [row_id], [ms]),
            self.shard_timeout_s,
        )
        return {
            "id": row_id,
            "shard": shard,
            "deleted": True,
            "part": part,
            "deleted_at_ms": ms,
            "hidden": bool(ok and answer.get("applied")),
        }

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

    async def _embed_image(self, image: bytes, limits: Limits) -> np.ndarray:
        if self.embedder is None:
            raise ApiError(
                501,
                "image_queries_disabled",
                "this app serves vectors that no image model made (image_queries: false); "
                "send a JSON vector",
            )
        image_size = await self._embedder_image_size()
        crop = await asyncio.to_thread(image_crop, image, image_size, limits)
        ok, vector = await call_with_deadline(
            self.embedder.embed.remote(crop), self.embed_timeout_s
        )
        if not ok:
            raise ApiError(503, "embedder_unavailable", f"the query embedder failed: {vector}")
        return vector

    async def _query_vector(self, query: ParsedQuery, limits: Limits) -> np.ndarray:
        if query.kind == "vector":
            return query.vector
        if query.kind == "id":
            shard = shard_of(query.row_id, self.num_shards)
            ok, vector = await call_with_deadline(
                self._searcher(shard).vector_of.remote(shard, query.row_id),
                self.shard_timeout_s,
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
        crop = await asyncio.to_thread(image_crop, query.image, image_size, limits)
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
