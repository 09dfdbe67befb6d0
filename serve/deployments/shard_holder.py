"""One shard inside a searcher replica: its live view, swaps, fallback, lease and stats.

A ``ShardHolder`` keeps the shard's live view (``index.live.delta.LiveShard``: live version +
delta - tombstones). It starts on the live version, or, when that is refused, on the newest
older version that loads (the rule garbage collection keeps too:
``index.storage.versions.newest_loadable``). A new live version is loaded beside the old view
and swapped in as one reference, the delta rows and tombstones carried over, so no query sees a
half-loaded index or fails during the swap; writes handed over meanwhile wait on ``swap_lock``
so none lands in a view being replaced. After each swap the holder writes its lease (the
version it serves: garbage collection never deletes a version a fresh lease names) and drops the
node-cache copy of the version it left. A plain class, without Serve: the searcher deployment
(``serve.deployments.searcher``) holds one per shard of its group and polls them.
"""

from __future__ import annotations

import logging
import threading
import time

from index.ann.shard_index import IndexLoadError, ShardIndex
from index.live.delta import LiveShard, load_live_shard
from index.storage.leases import write_lease
from index.storage.manifest import Manifest
from index.storage.publish import list_versions
from index.storage.store import Store
from index.storage.versions import fallback_order, newest_loadable

log = logging.getLogger("ray.serve")


class ShardHolder:
    """One shard inside a searcher replica: its live view, swaps, fallback, lease and stats."""

    def __init__(self, store: Store, shard: int, replica: str, manifest: Manifest):
        self.store = store
        self.shard = shard
        self.replica = replica
        self.view: LiveShard | None = None  # base version + delta - tombstones
        self.swap_lock = threading.Lock()  # hand-overs vs. the swap to a new version
        self.loaded_at: float | None = None
        self.reloads = 0
        self.load_error: str | None = None
        self.lease_error: str | None = None
        self._load_first(manifest)
        self.report()

    # ---- loading ------------------------------------------------------------------------------
    def _load_first(self, manifest: Manifest) -> None:
        """Start on the live version; if it cannot be loaded (a corrupt or missing file), on the
        newest earlier version that can, so a replica that restarts while a bad version is live
        still serves its shard. Which one is the rule garbage collection keeps too
        (``index.storage.versions.newest_loadable``). The poll keeps retrying the live version;
        the error is in ``stats()`` meanwhile. Rows newer than the fallback version are its delta
        (exact)."""
        state = manifest.shards.get(self.shard)
        if state is None or state.dir is None:  # no index yet: the delta alone
            self.load_live(manifest)
            return
        found = newest_loadable(
            fallback_order(state.dir, state.version, lambda: list_versions(self.store, self.shard)),
            lambda name: load_live_shard(
                self.store, self.shard, name, manifest.dim, manifest.metric
            ),
            refused=lambda name, e: self._refused(name, e, live=state.dir),
        )
        if found is None:
            raise IndexLoadError(f"shard {self.shard}: no version loads; {self.load_error}")
        name, view = found
        self._install(view)
        if name != state.dir:
            log.warning(
                "shard %d: serving version %s until %d loads", self.shard, name, state.version
            )

    def _refused(self, name: str, error: IndexLoadError, live: str) -> None:
        if name == live:
            self.load_error = f"{type(error).__name__}: {error}"
            log.warning("shard %d: live version refused: %s", self.shard, self.load_error)
        else:
            log.warning("shard %d: version %s refused too: %s", self.shard, name, error)

    def load_live(self, manifest: Manifest) -> bool:
        """Load the manifest's live version if it differs from ours; True when swapped.

        The new version is loaded while the old view keeps serving; the delta rows and
        tombstones carry over (``LiveShard.rebased``) and one reference is swapped.
        """
        if self.shard not in manifest.shards:
            return False
        state = manifest.shards[self.shard]
        current = self.view
        if current is not None and (state.dir is None or current.version_dir == state.dir):
            return False
        if current is None:
            view = load_live_shard(self.store, self.shard, state.dir, manifest.dim, manifest.metric)
            self._install(view)
        else:
            base = ShardIndex.load(self.store, self.shard, state.dir)  # the slow part, unlocked
            with self.swap_lock:  # no hand-over lands in the old view after this copy
                view = current.rebased(base)
                self.view, self.loaded_at = view, time.time()
            self._swapped(current, view)
        view.refresh()  # parts written while the version loaded
        return True

    def _install(self, view: LiveShard) -> None:
        """Swap ``view`` in (one reference: atomic for readers)."""
        with self.swap_lock:
            old, self.view, self.loaded_at = self.view, view, time.time()
        self._swapped(old, view)

    def _swapped(self, old: LiveShard | None, view: LiveShard) -> None:
        """After a swap: report the new version, and drop the local copy of the old one."""
        self.report()
        if old is not None and old.base is not None and old.version_dir != view.version_dir:
            # queries already running on the old view keep its memory-mapped files open
            self.store.evict_local(self.store.index_version_dir(self.shard, old.version_dir))

    def report(self) -> None:
        """Write this replica's lease for the shard: the version it serves (GC reads it)."""
        view = self.view
        try:
            write_lease(self.store, self.shard, self.replica, view.version_dir if view else None)
            self.lease_error = None
        except Exception as e:  # keep serving; GC keeps versions of replicas it cannot see
            self.lease_error = f"{type(e).__name__}: {e}"
            log.warning("shard %d: could not write its lease: %s", self.shard, self.lease_error)

    def poll(self, manifest: Manifest | None, delta: bool) -> None:
        """One poll round: swap to a new live version (when ``manifest`` is given), then read
        new parts and tombstones (when ``delta``). Errors keep the current view serving."""
        try:
            if manifest is not None and self.load_live(manifest):
                self.reloads += 1
                log.info("shard %d now serves %s", self.shard, self.view.version_dir)
            view = self.view
            if delta and view is not None:
                view.refresh()
            self.load_error = None
        except Exception as e:  # keep serving the version we have
            self.load_error = f"{type(e).__name__}: {e}"
            log.warning("shard %d: reload failed: %s", self.shard, self.load_error)

    # ---- requests -----------------------------------------------------------------------------
    def hand_over(self, method: str, *args) -> dict:
        with self.swap_lock:  # never into a view that is being replaced
            view = self.view
            if view is None:
                return {"applied": False, "version": None}
            getattr(view, method)(*args)
            return {"applied": True, "version": view.version}

    def ready(self) -> dict:
        view = self.view
        return {
            "shard": self.shard,
            "loaded": view is not None,
            "version": None if view is None else view.version,
            "count": 0 if view is None else view.count,
        }

    def stats(self) -> dict:
        view = self.view
        body = {
            "shard": self.shard,
            "version": None,
            "version_dir": None,
            "count": 0,
            "memory_bytes": 0,
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
            "reload_error": self.load_error,
            "lease_error": self.lease_error,
        }
        if view is not None:
            meta = view.meta or {}
            body.update(
                version=view.version,
                version_dir=view.version_dir,
                count=view.count,
                dim=view.dim,
                metric=view.metric,
                memory_bytes=int(view.memory_bytes()),
                kind=meta.get("kind"),
                factory=meta.get("factory"),
                **view.stats(),  # delta, delta_rows, tombstones, hidden_base_rows
            )
        return body
