"""Shard searchers: a replica serves a *group* of shards, so a query costs one call per group.

``ShardSearcher`` is one Serve deployment per group of shards (``serve.app``: all shards of a
single box in one group by default, ``shards_per_group`` on a cluster, 1 for one deployment per
shard). A replica holds one ``ShardHolder`` per shard of its group
(``serve.deployments.shard_holder``), each with that shard's own live view
(``index.live.delta.LiveShard``: live version + delta - tombstones), swaps, lease and
rebuilds, exactly as a one-shard replica did; what the group adds:

- **One call per group.** ``search`` searches every shard of the group
  (``index.live.group_search``: each shard proposes its exactly scored candidates, in a small
  thread pool since FAISS releases the GIL; the group ranks them once and reads only the
  answer's rows), so the ingress makes one call per group and merges groups, not shards. In a
  hash store each shard reranks candidates for its share of the top k (``index.query.share``).
- **Batching across requests.** Queries that reach the replica while it is searching are
  searched together next, as one FAISS batch per shard, and split back per request
  (``serve.deployments.batching.QueryBatcher``; requests with other search parameters, or a
  ``k`` in another power-of-4 band, form their own sub-batch: ``batching.sub_batches``). A
  lone query starts at once (or after ``batch_wait_s``, 0 by default).

Background threads, so that nothing slow on one shard holds up another shard or the leases:

- **Manifest** (one per replica): read for the whole group every ``reload_interval_s``.
- **One poll thread per shard**: a shard whose live version changed loads it beside the old one
  and swaps one reference, so no query sees a half-loaded index or fails during the swap; and
  every ``delta_poll_s`` it lists the shard's parts and tombstones (other writers' rows). A swap
  that takes minutes (a big version: download and SHA-256) stalls only its own shard's delta
  polls (the shard's view is being replaced anyway); the group's other shards keep polling.
- **Leases** (one per replica): writes each shard's lease (``index.storage.leases``) every
  ``lease_interval_s``, whatever loads or polls are doing; it starts before the first load, and
  each holder also writes its lease before fetching a version ("loading") and after a swap.
  Garbage collection never deletes a version a lease names as served or loading.

Writes routed to the replica (``add_rows``, ``add_tombstones``) are searchable when they return;
on an object store, the node-cache copy of a version a shard swapped away from is evicted.

**One request fails alone.** ``_search_batch`` searches each sub-batch of requests that share
parameters together; when that call raises, each request of the sub-batch is searched again on
its own and only the one(s) that still fail get the error (``batching.Failed``), so a bad
query (an expanded query that overflowed to inf) never fails another caller's request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve

from index.ann.threads import use_threads
from index.live.group_search import GroupQuery, search_group
from index.query.filters import Filter
from index.query.merge import merge_topk
from index.query.region_hits import fetch_rows, to_images
from index.query.share import share_k
from index.rows import clock
from index.rows.regions import per_image
from index.storage.manifest import load_manifest
from index.storage.store import Store
from serve.deployments.batching import Failed, QueryBatcher, sub_batches
from serve.deployments.idle import Backoff
from serve.deployments.shard_holder import ShardHolder
from serve.metrics import searcher_metrics

log = logging.getLogger("ray.serve")
# a shard's gauges are published when its poll changed something, else this often: 16 shards
# polled every 0.5 s spent 3 % of a busy replica's CPU recounting gauges that had not moved
PUBLISH_EVERY_S = 10.0


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (tests call the class directly)
        return uuid.uuid4().hex[:12]


@serve.deployment(name="ShardSearcher")
class ShardSearcher:
    def __init__(
        self,
        store_uri: str,
        shards: list[int] | int,
        reload_interval_s: float = 30.0,
        threads: int = 1,
        delta_poll_s: float = 0.5,
        storage_options: dict | None = None,
        lease_interval_s: float = 10.0,
        batch_wait_s: float = 0.0,
        max_batch: int = 64,
        parallel_shards: int = 2,
        clock_skew_ms: int = 0,
        delta_poll_idle_max_s: float | None = None,
        reload_idle_max_s: float | None = None,
        poll_idle_after_s: float = 10.0,
    ):
        self.threads = threads  # FAISS's per searching thread (index.ann.threads)
        use_threads(threads)
        self.store = Store(store_uri, storage_options)
        self.shards = [shards] if isinstance(shards, int) else list(shards)
        self.replica = _replica_id()
        clock.skew_for(self.replica, clock_skew_ms)  # tests: the history checker's skew
        manifest = load_manifest(self.store)
        if manifest is None:
            raise RuntimeError(f"store {store_uri} has no manifest")
        self.metric, self.num_shards = manifest.metric, manifest.num_shards
        # rows per image (index.rows.regions): fixed when the store was made
        self.per_image = per_image(manifest.regions)
        self._stop = threading.Event()
        # holders first, loaded after the lease thread runs: a first load that takes longer than
        # the lease TTL keeps its "loading" lease fresh
        self.holders = {s: ShardHolder(self.store, s, self.replica) for s in self.shards}
        if lease_interval_s > 0:
            self._thread(self._renew_leases, "leases", lease_interval_s)
        try:
            for holder in self.holders.values():
                holder.start(manifest)
        except BaseException:
            self._close()
            raise
        self._parallel = max(1, min(parallel_shards, len(self.shards)))
        self._pool = ThreadPoolExecutor(
            max_workers=self._parallel,
            thread_name_prefix="shard-search",
            initializer=use_threads,
            initargs=(threads,),
        )
        self.batcher = QueryBatcher(self._search_batch, max_batch=max_batch, wait_s=batch_wait_s)
        self._publish()
        # polls back off while the replica is idle (serve.deployments.idle); None caps: never
        self._idle = {
            s: Backoff(delta_poll_s or 1.0, delta_poll_idle_max_s, poll_idle_after_s)
            for s in self.shards
        }
        self._manifest_idle = Backoff(
            reload_interval_s or 1.0, reload_idle_max_s, poll_idle_after_s
        )
        self._manifest_wake = threading.Event()
        if reload_interval_s > 0:
            self._thread(self._poll_manifest, "manifest")
        if reload_interval_s > 0 or delta_poll_s > 0:
            for holder in self.holders.values():
                self._thread(self._poll_shard, f"poll-{holder.shard}", holder, delta_poll_s)

    # ---- background ---------------------------------------------------------------------------
    def _thread(self, target, name: str, *args) -> None:
        threading.Thread(target=target, args=args, daemon=True, name=name).start()

    def _renew_leases(self, every_s: float) -> None:
        """Every shard's lease, every ``every_s``: on its own thread, so no load or poll (each
        on its shard's thread) delays a renewal."""
        while not self._stop.wait(every_s):
            for holder in list(self.holders.values()):
                holder.report()

    def _poll_manifest(self) -> None:
        """The manifest, once for the whole group, handed to each shard's poll thread when it
        changed (or a shard does not serve its live version yet: retried); read every
        ``reload_interval_s``, less often while nothing changes and the replica is idle."""
        seen = None
        while not self._stop.is_set():
            self._manifest_wake.wait(self._manifest_idle.wait_s)
            self._manifest_wake.clear()
            if self._stop.is_set():
                return
            try:
                manifest = load_manifest(self.store)
            except Exception as e:
                log.warning("reading the manifest failed: %s", e)
                continue
            if manifest is None:
                continue
            token = (manifest.sequence, manifest.written_at)
            changed, seen = token != seen, token
            _ = self._manifest_idle.touch() if changed else self._manifest_idle.quiet()
            for holder in self.holders.values():
                if changed or not holder.serves_live():
                    holder.offer(manifest)

    def _poll_shard(self, holder: ShardHolder, delta_s: float) -> None:
        """One shard: swap when the manifest thread offers a new live version, list its parts
        every ``delta_s`` (less often while nothing changes and the replica is idle). A long
        swap here holds up only this shard."""
        idle, published = self._idle[holder.shard], time.monotonic()
        while not self._stop.is_set():
            holder.wake.wait(idle.wait_s)
            holder.wake.clear()
            if self._stop.is_set():
                return
            manifest, holder.pending = holder.pending, None
            if manifest is None and delta_s <= 0:
                continue
            changed = holder.poll(manifest, delta_s > 0)
            _ = idle.touch() if changed else idle.quiet()
            if changed or time.monotonic() - published >= PUBLISH_EVERY_S:
                self._publish_one(holder)
                published = time.monotonic()

    def _used(self) -> None:
        """A search, write or stamp: polls go back to their intervals, and a backed-off poll
        thread looks at the store now (``serve.deployments.idle``)."""
        for shard, idle in self._idle.items():
            if idle.touch():
                self.holders[shard].wake.set()
        if self._manifest_idle.touch():
            self._manifest_wake.set()

    def reload(self) -> dict:
        """Look for new live versions now (tests and operators; the poll does it on its own)."""
        self._used()
        manifest = load_manifest(self.store)
        swapped = {s: h.load_live(manifest) for s, h in self.holders.items()}
        return {"swapped": swapped}

    def _publish(self) -> None:
        """Index gauges (version, rows, memory, delta) for Ray's Prometheus export."""
        for holder in self.holders.values():
            self._publish_one(holder)

    def _publish_one(self, holder: ShardHolder) -> None:
        try:
            searcher_metrics().publish(holder.stats())
        except Exception:  # metrics must never take the shard down
            log.exception("shard %d: publishing metrics failed", holder.shard)

    def _close(self) -> None:
        """Stop the threads and drop the leases (best effort: a stale lease expires)."""
        self._stop.set()
        if getattr(self, "_manifest_wake", None) is not None:
            self._manifest_wake.set()
        for holder in getattr(self, "holders", {}).values():
            holder.wake.set()
            holder.close()

    def __del__(self):
        if getattr(self, "_stop", None) is not None:
            self._close()

    # ---- search -------------------------------------------------------------------------------
    async def search(
        self,
        vector: np.ndarray,
        k: int,
        nprobe: int | None = None,
        candidates: int | None = None,
        rerank: bool = True,
        filter: Filter | None = None,  # noqa: A002 (the API's word)
        fields: Sequence[str] | None = None,
        shards: Sequence[int] | None = None,
    ) -> dict:
        """Top-k over the group's shards for one query (``shards``: those of them a routed
        store's planner chose, None: all): ``{"ids", "uris", "scores", "shards", "answered",
        "batch"}`` (``answered``: the shards searched; ``batch``: how many queries were
        searched together), plus ``"metadata"`` (one object per hit: the ``fields``
        asked) and ``"plans"`` (shard -> how a ``filter`` was searched there,
        ``index.ann.filter_plan``). ``filter`` arrives parsed and checked by the ingress
        (``index.query.filters``); each shard evaluates it on its own columns. Batched with
        concurrent queries that share the parameters, filter and fields (``QueryBatcher``)."""
        self._used()
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        names = tuple(fields) if fields else ()
        only = None if shards is None else tuple(sorted(int(s) for s in shards))
        return await self.batcher.submit(
            (query, int(k), nprobe, candidates, bool(rerank), filter, names, only)
        )

    def _search_batch(self, requests: list[tuple]) -> list[dict]:
        """One FAISS batch per shard for the queued requests that share search parameters,
        filter and fields (runs in the batcher's worker thread). In a routed store requests
        visit different shards: each shard searches the requests that visit it, as one batch."""
        use_threads(self.threads)  # the batcher's thread: OpenMP's count is per thread
        out: list[dict | Failed | None] = [None] * len(requests)
        # the query's length too: in a store with a transform an id's vector is in the store's
        # space, other queries in the model's (index.ann.transform); one batch holds one size
        keys = [(request[1], (len(request[0]), *request[2:7])) for request in requests]
        for members in sub_batches(keys):
            try:
                self._search_members(requests, members, out)
            except Exception as e:
                if len(members) == 1:
                    out[members[0]] = Failed(e)
                    continue
                for i in members:  # find the request(s) at fault: each fails alone
                    try:
                        self._search_members(requests, [i], out)
                    except Exception as alone:
                        out[i] = Failed(alone)
        return out

    def _search_members(self, requests: list[tuple], members: list[int], out: list) -> None:
        """Search ``requests[i] for i in members`` (same parameters) as one batch into ``out``."""
        nprobe, candidates, rerank, flt, fields = requests[members[0]][2:7]
        queries = np.stack([requests[i][0] for i in members])
        k = max(requests[i][1] for i in members)
        visits = [requests[i][7] for i in members]
        merged = self._search_all(queries, k, nprobe, candidates, rerank, flt, fields, visits)
        for row, i in enumerate(members):
            hits = merged["hits"][row][: requests[i][1]]
            answer = {
                "ids": [h.id for h in hits],
                "uris": [h.uri for h in hits],
                "scores": [float(h.score) for h in hits],
                "shards": [h.shard for h in hits],
                "answered": merged["answered"][row],
                "batch": len(members),
            }
            if fields:
                answer["metadata"] = [h.metadata for h in hits]
            if self.per_image > 1:
                answer["regions"] = [h.region for h in hits]
            if merged["plans"]:
                answer["plans"] = merged["plans"]
            out[i] = answer

    def _search_all(
        self, queries, k, nprobe, candidates, rerank, flt=None, fields=(), visits=None
    ) -> dict:
        """The group's shards over the batch (``index.live.group_search``: each shard proposes
        in the pool, the group ranks once), per query: every shard, or (``visits``: per query,
        the shards it visits, None: all) each shard over the queries that visit it.
        ``answered``: per query, the shards that searched it."""
        n = len(queries)
        visits = visits or [None] * n
        everyone = list(range(n))
        every_shard = all(v is None for v in visits)  # a hash store: each shard takes them all
        for shard in {s for visit in visits if visit for s in visit}:
            self._holder(shard)  # a shard this group does not serve: ValueError
        asked = []
        for holder in self.holders.values():
            who = [q for q in everyone if visits[q] is None or holder.shard in visits[q]]
            if who:
                asked.append((holder.view, holder.shard, who))
        ask = GroupQuery(
            k=k,  # a hash shard is asked for its share of the top k, not all k
            share=share_k(k, self.num_shards) if every_shard else k,
            nprobe=nprobe,
            candidates=candidates,
            rerank=rerank,
            filter=flt,
            fields=tuple(fields or ()),
            per_image=self.per_image,
            visits=self.num_shards if every_shard else 1,  # routed: each shard's own floor
        )
        observe = searcher_metrics().observe_search
        found = search_group(
            asked, queries, ask, self.metric, self._pool.map, observe, self._parallel
        )
        return {"hits": found.hits, "answered": found.answered, "plans": found.plans}

    # ---- writes and lookups -------------------------------------------------------------------
    def _holder(self, shard: int) -> ShardHolder:
        holder = self.holders.get(shard)
        if holder is None:
            raise ValueError(f"shard {shard} is not served by this group ({self.shards})")
        return holder

    async def add_rows(
        self,
        shard: int,
        part: str,
        ids: list[str],
        uris: list[str],
        vectors: np.ndarray,
        ingested_ms: list[int],
        metadata: dict[str, list] | None = None,
    ) -> dict:
        """Rows the ingress just wrote durably as ``part`` (with their typed ``metadata``
        columns, column -> values): searchable when this returns."""
        self._used()
        holder = self._holder(shard)
        args = (part, ids, uris, np.asarray(vectors), ingested_ms, metadata)
        return await self._hand_over(holder, "add_rows", *args)

    async def stamp(self, shard: int, ids: list[str]) -> int:
        """The stamp for a write of ``ids`` of ``shard`` (``ShardHolder.stamp``): after every
        write of them this replica knows. The ingress asks before it writes the part."""
        self._used()
        return self._holder(shard).stamp(list(ids))  # microseconds: no thread hop

    async def add_tombstones(
        self, shard: int, part: str, ids: list[str], deleted_ms: list[int]
    ) -> dict:
        """Deletes the ingress just wrote durably as ``part``: hidden when this returns."""
        self._used()
        holder = self._holder(shard)
        return await self._hand_over(holder, "add_tombstones", part, ids, deleted_ms)

    async def _hand_over(self, holder: ShardHolder, method: str, *args) -> dict:
        """A write handed to the shard's view, then its gauges (the poll publishes only what
        it changed itself)."""
        applied = await asyncio.to_thread(holder.hand_over, method, *args)
        self._publish_one(holder)
        return applied

    async def vectors_of(self, pairs: list[tuple[int, str]]) -> list[np.ndarray | None]:
        """The visible vectors of ``(shard, id)`` pairs of this group, in order (None where a row
        is gone): what dedup and diversification compare answers with, in one call per group."""

        def lookup() -> list[np.ndarray | None]:
            out: list[np.ndarray | None] = []
            for shard, row_id in pairs:
                view = self._holder(shard).view
                vector = None if view is None else view.vector_of(row_id)
                out.append(None if vector is None else np.asarray(vector, np.float32))
            return out

        return await asyncio.to_thread(lookup)

    async def search_exact(self, vector: np.ndarray, k: int) -> dict:
        """Brute-force top-k over the group's visible rows (``LiveShard.search_exact``), as
        ``{"ids", "scores", "shards", "answered"}``: the recall canary's reference. A scan of
        every vector of the group: the canary bounds how often it asks
        (``serve.deployments.canary``)."""
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)

        def run() -> dict:
            use_threads(self.threads)
            per_shard, answered = [], []
            for holder in self.holders.values():
                view = holder.view
                if view is None:
                    continue
                rows = fetch_rows(int(k), self.per_image)
                per_shard.append(to_images(view.search_exact(query, rows)[0]))
                answered.append(holder.shard)
            hits = merge_topk(per_shard, int(k), self.metric)
            return {
                "ids": [h.id for h in hits],
                "scores": [float(h.score) for h in hits],
                "shards": [h.shard for h in hits],
                "answered": answered,
            }

        return await asyncio.to_thread(run)

    async def vector_of(self, shard: int, row_id: str) -> np.ndarray | None:
        view = self._holder(shard).view
        if view is None:
            return None
        vector = await asyncio.to_thread(view.vector_of, row_id)
        return None if vector is None else np.asarray(vector, dtype=np.float32)

    async def record(
        self, shard: int, row_id: str, fields: Sequence[str] | None = None
    ) -> dict | None:
        """The visible row ``row_id`` of ``shard`` as ``{"id", "uri", "shard", ...,
        "metadata"}`` (the ``fields`` asked; default every column), or None."""
        view = self._holder(shard).view
        if view is None:
            return None
        return await asyncio.to_thread(view.record_of, row_id, fields)

    def ready(self) -> list[dict]:
        return [holder.ready() for holder in self.holders.values()]

    def stats(self) -> list[dict]:
        return [holder.stats() for holder in self.holders.values()]

    async def facets(self) -> list[dict]:
        """Each shard's column facets (one pass over its metadata: off the event loop)."""
        return await asyncio.to_thread(lambda: [h.facets() for h in self.holders.values()])


def searcher_args(config, shards: list[int]) -> tuple:
    """``ShardSearcher``'s constructor arguments for a group, from a ``ServeConfig``."""
    return (
        config.store,
        shards,
        config.reload_interval_s,
        config.search_threads,
        config.delta_poll_s,
        config.storage_options,
        config.lease_interval_s,
        config.search_batch_wait_ms / 1000,
        config.search_max_batch,
        config.search_parallel_shards,
        config.clock_skew_ms,
        config.delta_poll_idle_max_s,
        config.reload_idle_max_s,
        config.poll_idle_after_s,
    )
