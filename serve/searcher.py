"""ShardSearcher: one deployment per shard, each replica holding that shard's live index.

A replica loads the version the manifest names as live (``ShardIndex.load``), searches in a
worker thread (FAISS releases the GIL) so one replica serves concurrent requests, and answers
with plain lists (cheap to serialise back to the ingress). A background thread polls the
manifest; when a rebuild commits a new live version the replica loads it beside the old one and
swaps a single reference, so no query sees a half-loaded index or fails during the swap.

What a replica serves is the shard's live view (``index.delta.LiveShard``): the live version,
plus the rows written since (the delta, searched exactly), minus deletes (tombstones). The same
thread polls the store listing every ``delta_poll_s`` for parts and tombstones other writers
added; the replica a write was routed to gets it handed over (``add_rows``, ``add_tombstones``)
before the write's HTTP response, so it is searchable at once there and on every other replica
of the shard within ``delta_poll_s`` (plus the time to read the part).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
from ray import serve

from index.build import list_versions
from index.delta import LiveShard, load_live_shard
from index.manifest import load_manifest
from index.shard_index import IndexLoadError, ShardIndex
from index.store import Store
from serve.metrics import searcher_metrics

log = logging.getLogger("ray.serve")


@serve.deployment(name="ShardSearcher")
class ShardSearcher:
    def __init__(
        self,
        store_uri: str,
        shard: int,
        reload_interval_s: float = 30.0,
        threads: int = 1,
        delta_poll_s: float = 0.5,
    ):
        import faiss

        faiss.omp_set_num_threads(threads)  # several replicas share the CPUs
        self.store = Store(store_uri)
        self.shard = shard
        self.index: LiveShard | None = None  # base version + delta - tombstones
        self._swap_lock = threading.Lock()  # hand-overs vs. the swap to a new version
        self.loaded_at: float | None = None
        self.reloads = 0
        self.load_error: str | None = None
        self._load_first()
        self._publish()
        self._stop = threading.Event()
        if reload_interval_s > 0 or delta_poll_s > 0:
            threading.Thread(
                target=self._poll,
                args=(reload_interval_s, delta_poll_s),
                daemon=True,
                name="reload",
            ).start()

    # ---- loading ------------------------------------------------------------------------------
    def _load_first(self) -> None:
        """Start on the live version; if it cannot be loaded (a corrupt or missing file), on the
        newest earlier version that can, so a replica that restarts while a bad version is live
        still serves its shard. The poll thread keeps retrying the live version; the error is in
        ``stats()`` meanwhile. Rows newer than the fallback version are its delta (exact)."""
        try:
            self._load_live()
            return
        except IndexLoadError as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.warning("shard %d: live version refused: %s", self.shard, self.load_error)
        manifest = load_manifest(self.store)
        live = manifest.shards[self.shard].version
        for version in sorted(
            (v for v in list_versions(self.store, self.shard) if v < live), reverse=True
        ):
            try:
                view = load_live_shard(
                    self.store, self.shard, version, manifest.dim, manifest.metric
                )
            except IndexLoadError as e:
                log.warning("shard %d: version %d refused too: %s", self.shard, version, e)
                continue
            self.index, self.loaded_at = view, time.time()
            log.warning("shard %d: serving version %d until %d loads", self.shard, version, live)
            return
        raise IndexLoadError(f"shard {self.shard}: no version loads; {self.load_error}")

    def _load_live(self) -> bool:
        """Load the manifest's live version if it differs from ours; True when swapped.

        The new version is loaded while the old view keeps serving; the delta rows and
        tombstones carry over (``LiveShard.rebased``) and one reference is swapped.
        """
        manifest = load_manifest(self.store)
        if manifest is None or self.shard not in manifest.shards:
            return False
        version = manifest.shards[self.shard].version
        current = self.index
        if current is not None and (version is None or current.version == version):
            return False
        if current is None:
            view = load_live_shard(self.store, self.shard, version, manifest.dim, manifest.metric)
        else:
            base = ShardIndex.load(self.store, self.shard, version)  # the slow part, unlocked
            with self._swap_lock:
                view = current.rebased(base)
                self.index = view  # one reference swap: atomic for readers
        self.index, self.loaded_at = view, time.time()
        view.refresh()  # parts written while the version loaded
        return True

    def _poll(self, reload_s: float, delta_s: float) -> None:
        tick = min(t for t in (reload_s, delta_s) if t > 0)
        next_reload = time.monotonic() + reload_s
        while not self._stop.wait(tick):
            try:
                if reload_s > 0 and time.monotonic() >= next_reload:
                    next_reload = time.monotonic() + reload_s
                    if self._load_live():
                        self.reloads += 1
                        log.info("shard %d now serves version %s", self.shard, self.index.version)
                view = self.index
                if delta_s > 0 and view is not None:
                    view.refresh()
                self.load_error = None
            except Exception as e:  # keep serving the version we have
                self.load_error = f"{type(e).__name__}: {e}"
                log.warning("shard %d: reload failed: %s", self.shard, self.load_error)
            self._publish()

    def _publish(self) -> None:
        """Index gauges (version, rows, memory, delta) for Ray's Prometheus export."""
        try:
            searcher_metrics().publish(self.stats())
        except Exception:  # metrics must never take the shard down
            log.exception("shard %d: publishing metrics failed", self.shard)

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # ---- requests -----------------------------------------------------------------------------
    async def search(
        self,
        vector: np.ndarray,
        k: int,
        nprobe: int | None = None,
        candidates: int | None = None,
        rerank: bool = True,
    ) -> dict:
        """Top-k of this shard for one query: ``{"ids", "uris", "scores", "version"}``."""
        index = self.index
        if index is None:
            return {"ids": [], "uris": [], "scores": [], "version": None}
        queries = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        start = time.perf_counter()
        hits = (
            await asyncio.to_thread(
                index.search, queries, k, nprobe=nprobe, candidates=candidates, rerank=rerank
            )
        )[0]
        searcher_metrics().observe_search(
            self.shard,
            (time.perf_counter() - start) * 1000,
            index.fetch_size(k, candidates, rerank),
        )
        return {
            "ids": [h.id for h in hits],
            "uris": [h.uri for h in hits],
            "scores": [float(h.score) for h in hits],
            "version": index.version,
        }

    async def add_rows(
        self,
        part: str,
        ids: list[str],
        uris: list[str],
        vectors: np.ndarray,
        ingested_ms: list[int],
    ) -> dict:
        """Rows the ingress just wrote durably as ``part``: searchable when this returns."""
        return await asyncio.to_thread(
            self._hand_over, "add_rows", part, ids, uris, np.asarray(vectors), ingested_ms
        )

    async def add_tombstones(self, part: str, ids: list[str], deleted_ms: list[int]) -> dict:
        """Deletes the ingress just wrote durably as ``part``: hidden when this returns."""
        return await asyncio.to_thread(self._hand_over, "add_tombstones", part, ids, deleted_ms)

    def _hand_over(self, method: str, *args) -> dict:
        with self._swap_lock:  # never into a view that is being replaced
            view = self.index
            if view is None:
                return {"applied": False, "version": None}
            getattr(view, method)(*args)
            return {"applied": True, "version": view.version}

    async def vector_of(self, row_id: str) -> np.ndarray | None:
        index = self.index
        if index is None:
            return None
        vector = await asyncio.to_thread(index.vector_of, row_id)
        return None if vector is None else np.asarray(vector, dtype=np.float32)

    async def record(self, row_id: str) -> dict | None:
        """``GET /images/{id}``: the visible row's id, uri, shard and source, or None."""
        index = self.index
        return None if index is None else await asyncio.to_thread(index.record_of, row_id)

    def ready(self) -> dict:
        index = self.index
        return {
            "shard": self.shard,
            "loaded": index is not None,
            "version": None if index is None else index.version,
            "count": 0 if index is None else index.count,
        }

    def stats(self) -> dict:
        index = self.index
        body = {
            "shard": self.shard,
            "version": None,
            "count": 0,
            "memory_bytes": 0,
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
            "reload_error": self.load_error,
        }
        if index is not None:
            meta = index.meta or {}
            body.update(
                version=index.version,
                count=index.count,
                dim=index.dim,
                metric=index.metric,
                memory_bytes=int(index.memory_bytes()),
                kind=meta.get("kind"),
                factory=meta.get("factory"),
                **index.stats(),  # delta, delta_rows, tombstones, hidden_base_rows
            )
        return body
