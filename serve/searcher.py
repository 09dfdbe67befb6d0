"""ShardSearcher: one deployment per shard, each replica holding that shard's live index.

A replica loads the version the manifest names as live (``ShardIndex.load``), searches in a
worker thread (FAISS releases the GIL) so one replica serves concurrent requests, and answers
with plain lists (cheap to serialise back to the ingress). A background thread polls the
manifest; when a rebuild commits a new live version the replica loads it beside the old one and
swaps a single reference, so no query sees a half-loaded index or fails during the swap.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
from ray import serve

from index.manifest import load_manifest
from index.shard_index import ShardIndex
from index.store import Store

log = logging.getLogger("ray.serve")


@serve.deployment(name="ShardSearcher")
class ShardSearcher:
    def __init__(
        self,
        store_uri: str,
        shard: int,
        reload_interval_s: float = 30.0,
        threads: int = 1,
    ):
        import faiss

        faiss.omp_set_num_threads(threads)  # several replicas share the CPUs
        self.store = Store(store_uri)
        self.shard = shard
        self.index: ShardIndex | None = None
        self.loaded_at: float | None = None
        self.reloads = 0
        self.load_error: str | None = None
        self._load_live()
        self._stop = threading.Event()
        if reload_interval_s > 0:
            threading.Thread(
                target=self._poll, args=(reload_interval_s,), daemon=True, name="reload"
            ).start()

    # ---- loading ------------------------------------------------------------------------------
    def _live_version(self) -> int | None:
        manifest = load_manifest(self.store)
        if manifest is None or self.shard not in manifest.shards:
            return None
        return manifest.shards[self.shard].version

    def _load_live(self) -> bool:
        """Load the manifest's live version if it differs from ours; True when swapped."""
        version = self._live_version()
        if version is None or (self.index is not None and self.index.version == version):
            return False
        index = ShardIndex.load(self.store, self.shard, version)
        self.index, self.loaded_at = index, time.time()  # one reference swap: atomic for readers
        return True

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if self._load_live():
                    self.reloads += 1
                    log.info("shard %d now serves version %d", self.shard, self.index.version)
                self.load_error = None
            except Exception as e:  # keep serving the version we have
                self.load_error = f"{type(e).__name__}: {e}"
                log.warning("shard %d: reload failed: %s", self.shard, self.load_error)

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
        hits = (
            await asyncio.to_thread(
                index.search, queries, k, nprobe=nprobe, candidates=candidates, rerank=rerank
            )
        )[0]
        return {
            "ids": [h.id for h in hits],
            "uris": [h.uri for h in hits],
            "scores": [float(h.score) for h in hits],
            "version": index.version,
        }

    async def vector_of(self, row_id: str) -> np.ndarray | None:
        index = self.index
        if index is None:
            return None
        vector = await asyncio.to_thread(index.vector_of, row_id)
        return None if vector is None else np.asarray(vector, dtype=np.float32)

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
                delta=meta.get("delta_count", meta.get("delta")),
            )
        return body
