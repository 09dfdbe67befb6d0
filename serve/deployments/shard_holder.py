"""One shard inside a searcher replica: its live view, swaps, fallback, lease and stats.

A ``ShardHolder`` keeps the shard's live view (``index.live.delta.LiveShard``: live version +
delta - tombstones). It starts on the live version, or, when that is refused, on the newest
older version that loads (the rule garbage collection keeps too:
``index.storage.versions.newest_loadable``). A new live version is loaded beside the old view
and swapped in as one reference, the delta rows and tombstones carried over, so no query sees a
half-loaded index or fails during the swap; writes handed over meanwhile wait on ``swap_lock``
so none lands in a view being replaced.

Leases (``index.storage.leases``): *before* fetching a version the holder writes its lease
naming it as ``loading`` next to the version it serves, so garbage collection keeps both
while the download and SHA-256 check run (minutes for a big version); after the load the lease
names what it serves. ``report()`` is what the searcher's lease thread calls every
``lease_interval_s``, independent of loads and polls, so a load longer than the lease TTL never
lets the lease lapse. Lease writes are serialised per holder, so an older body never lands after
a newer one. After a swap the holder drops the node-cache copy of the version it left. A plain
class, without Serve: the searcher deployment (``serve.deployments.searcher``) holds one per
shard of its group and polls each on a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time

from index.ann.shard_index import IndexLoadError, ShardIndex
from index.ann.transform import Transform, load_transform
from index.live.delta import LiveShard, load_live_shard
from index.rows import clock
from index.storage.leases import drop_lease, write_lease
from index.storage.manifest import Manifest
from index.storage.publish import list_versions
from index.storage.store import Store
from index.storage.versions import fallback_order, newest_loadable

log = logging.getLogger("ray.serve")

CATCH_UP_ROUNDS = 8  # refreshes before a first load serves (each reads only what is new)


class ShardHolder:
    """One shard inside a searcher replica: its live view, swaps, fallback, lease and stats."""

    def __init__(self, store: Store, shard: int, replica: str, manifest: Manifest | None = None):
        self.store = store
        self.shard = shard
        self.replica = replica
        self.view: LiveShard | None = None  # base version + delta - tombstones
        self.loading: str | None = None  # the version being fetched (named in the lease)
        self.live_dir: str | None = None  # the live version of the newest manifest seen
        self.swap_lock = threading.Lock()  # hand-overs vs. the swap to a new version
        self._load_lock = threading.Lock()  # one load at a time (poll thread vs. reload())
        self._lease_lock = threading.Lock()  # lease writes in order, none after close()
        self._closed = False
        self.loaded_at: float | None = None
        self.reloads = 0
        self.load_error: str | None = None
        self.lease_error: str | None = None
        # the searcher's poll thread: the newest manifest not yet looked at, and its wake-up
        self.pending: Manifest | None = None
        self.wake = threading.Event()
        if manifest is not None:
            self.start(manifest)

    def start(self, manifest: Manifest) -> None:
        """The first load (the searcher starts its lease thread first, then calls this), caught
        up with the store before it returns (``catch_up``)."""
        with self._load_lock:
            try:
                self._load_first(manifest)
            finally:
                self._loaded()
        self.catch_up()

    def catch_up(self) -> int:
        """Refresh until a round lists nothing new (at most ``CATCH_UP_ROUNDS``); returns the
        parts applied.

        A replica that (re)starts reads its version and then every part listed once; the rows
        and deletes written *while* it loaded and read (on an object store with faults, tens of
        seconds) are not in that listing, and their writers were answered ``searchable: false``
        / ``hidden: false`` (the shard did not answer). Serving before they are in broke the
        documented bound for them: found by the history checker (issue #23, seed 2202: a
        ShardSearcher SIGKILLed mid-history came back without seven acknowledged adds and with
        a delete undone, for seconds after ``/readyz`` said ready). So the replica serves only
        once a refresh found nothing new: every part written before that last listing is in.
        A round that fails ends the catch-up (the poll thread retries every ``delta_poll_s``)."""
        applied = 0
        for _ in range(CATCH_UP_ROUNDS):
            view = self.view
            if view is None:
                break
            try:
                n = view.refresh()
            except Exception as e:  # a listing failed: serve what we have, the poll retries
                log.warning("shard %d: catching up with the store failed: %s", self.shard, e)
                break
            applied += n
            if n == 0 and not view.stats()["unreadable_parts"]:
                break
        return applied

    # ---- loading ------------------------------------------------------------------------------
    def _load_first(self, manifest: Manifest) -> None:
        """Start on the live version; if it cannot be loaded (a corrupt or missing file), on the
        newest earlier version that can, so a replica that restarts while a bad version is live
        still serves its shard. Which one is the rule garbage collection keeps too
        (``index.storage.versions.newest_loadable``). The poll keeps retrying the live version;
        the error is in ``stats()`` meanwhile. Rows newer than the fallback version are its delta
        (exact)."""
        state = manifest.shards.get(self.shard)
        self.live_dir = None if state is None else state.dir
        transform = load_transform(self.store, manifest)
        if state is None or state.dir is None:  # no index yet: the delta alone
            view = load_live_shard(
                self.store, self.shard, None, manifest.dim, manifest.metric, transform
            )
            self._install(view)
            return

        def attempt(name: str) -> LiveShard:
            self._loading(name)  # leased before a byte is fetched
            return load_live_shard(
                self.store, self.shard, name, manifest.dim, manifest.metric, transform
            )

        found = newest_loadable(
            fallback_order(state.dir, state.version, lambda: list_versions(self.store, self.shard)),
            attempt,
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
        with self._load_lock:
            state = manifest.shards[self.shard]
            self.live_dir = state.dir
            current = self.view
            if current is not None and (state.dir is None or current.version_dir == state.dir):
                return False
            try:
                self._loading(state.dir)  # leased before a byte is fetched
                transform = load_transform(self.store, manifest)
                if current is None or _digest(current.transform) != _digest(transform):
                    # first, or the store's first build learned a transform while this view
                    # served its delta in the model's space: read it all again in the new one
                    view = load_live_shard(
                        self.store, self.shard, state.dir, manifest.dim, manifest.metric, transform
                    )
                    self._install(view)
                else:
                    base = ShardIndex.load(self.store, self.shard, state.dir)  # slow, unlocked
                    # the rebase copies the delta and tombstones without blocking hand-overs,
                    # stamps or lookups; under swap_lock only the parts handed over meanwhile
                    view = current.rebased(base)
                    with self.swap_lock:  # no hand-over lands in the old view after this copy
                        current.carry_into(view)
                        self.view, self.loaded_at = view, time.time()
                    self._swapped(current, view)
            finally:
                self._loaded()
        self.catch_up()  # parts written while the version loaded
        return True

    def _install(self, view: LiveShard) -> None:
        """Swap ``view`` in (one reference: atomic for readers)."""
        with self.swap_lock:
            old, self.view, self.loaded_at = self.view, view, time.time()
        self._swapped(old, view)

    def _swapped(self, old: LiveShard | None, view: LiveShard) -> None:
        """After a swap: drop the local copy of the old version (the lease follows in
        ``_loaded``)."""
        if old is not None and old.base is not None and old.version_dir != view.version_dir:
            # queries already running on the old view keep its memory-mapped files open
            self.store.evict_local(self.store.index_version_dir(self.shard, old.version_dir))

    def _loading(self, name: str | None) -> None:
        """Lease ``name`` as being loaded, before fetching it: GC keeps it from now on. A lease
        write that fails does not stop the load (the lease thread retries every interval); the
        error is in ``stats()``."""
        self.loading = name
        self.report()

    def _loaded(self) -> None:
        """A load ended (swapped or failed): the lease names what is served, nothing loading."""
        self.loading = None
        self.report()

    def report(self) -> bool:
        """Write this replica's lease for the shard: the version it serves and the one it is
        loading (GC reads it). Called by loads and by the searcher's lease thread; True when
        written."""
        with self._lease_lock:  # the body is taken and written in one step: never out of order
            if self._closed:
                return False
            view = self.view
            try:
                write_lease(
                    self.store,
                    self.shard,
                    self.replica,
                    view.version_dir if view else None,
                    loading=self.loading,
                )
                self.lease_error = None
                return True
            except Exception as e:  # keep serving; GC keeps what a lapsed lease named a while
                self.lease_error = f"{type(e).__name__}: {e}"
                log.warning("shard %d: could not write its lease: %s", self.shard, self.lease_error)
                return False

    def close(self) -> None:
        """Stop leasing and drop the lease (best effort: a stale lease expires on its own)."""
        with self._lease_lock:
            self._closed = True
            try:
                drop_lease(self.store, self.shard, self.replica)
            except Exception:
                pass

    def offer(self, manifest: Manifest) -> None:
        """A manifest for the next poll of this shard (the searcher's manifest thread)."""
        self.pending = manifest
        self.wake.set()

    def poll(self, manifest: Manifest | None, delta: bool) -> bool:
        """One poll round: swap to a new live version (when ``manifest`` is given), then read
        new parts and tombstones (when ``delta``). Errors keep the current view serving. True
        when something changed or failed (a swap, parts applied, a part or the live version
        that could not be read): the poll then keeps its interval rather than backing off."""
        changed = False
        try:
            if manifest is not None and self.load_live(manifest):
                self.reloads += 1
                changed = True
                log.info("shard %d now serves %s", self.shard, self.view.version_dir)
            view = self.view
            if delta and view is not None:
                changed = view.refresh() > 0 or bool(view.stats()["unreadable_parts"]) or changed
            if view is None or self.live_dir in (None, view.version_dir):
                self.load_error = None  # serving a fallback: the live one's refusal stays said
        except Exception as e:  # keep serving the version we have
            self.load_error = f"{type(e).__name__}: {e}"
            log.warning("shard %d: reload failed: %s", self.shard, self.load_error)
            return True
        return changed

    def serves_live(self) -> bool:
        """Whether this holder serves the live version of the newest manifest it saw (if not,
        the manifest thread keeps offering it, so a refused version is retried)."""
        view = self.view
        return view is not None and self.live_dir in (None, view.version_dir)

    # ---- requests -----------------------------------------------------------------------------
    def stamp(self, ids: list[str]) -> int:
        """The stamp (ms) for a write of ``ids`` about to be made: later than every stamp this
        process gave (all of this shard's writes while it serves it: one clock per shard) and
        than every write of ``ids`` its view holds (what it read from the store: writes stamped
        by a replica that ran before it, or by another replica of the shard, once polled).
        ``index.rows.clock``: ordering without trusting clocks across processes. No store
        call: a stamp costs microseconds, also while the object store is slow. No view raises."""
        view = self.view
        if view is None:
            raise RuntimeError(f"shard {self.shard} is not loaded yet")
        return clock.stamp_after(view.newest_stamp(ids))

    # ---- requests -----------------------------------------------------------------------------
    def hand_over(self, method: str, *args) -> dict:
        with self.swap_lock:  # never into a view that is being replaced
            view = self.view
            if view is None:
                return {"applied": False, "version": None}
            getattr(view, method)(*args)
            return {"applied": True, "version": view.version}

    def ready(self) -> dict:
        """``loaded``: the holder serves the shard now; ``ready``: it serves an index version
        whenever the newest manifest it read names one (the live version, or the anchor while
        the live one is refused), judged now rather than from start-up counts."""
        view = self.view
        serving = None if view is None else view.version_dir
        return {
            "shard": self.shard,
            "loaded": view is not None,
            "ready": view is not None and (self.live_dir is None or serving is not None),
            "version": None if view is None else view.version,
            "version_dir": serving,
            "live_dir": self.live_dir,
            "loading": self.loading,
            "count": 0 if view is None else view.count,
        }

    def facets(self) -> dict:
        """What each metadata column holds among the rows this replica serves (``GET /facets``);
        a shard with nothing loaded yet says so rather than answering empty columns."""
        view = self.view
        if view is None:
            return {"shard": self.shard, "error": "no index loaded yet"}
        return {"shard": self.shard, "fields": view.facets()}

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
            "loading": self.loading,
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
                # what loading the version took (fetch, verify, open): a replica's start-up cost
                load_timings=getattr(view.base, "load_timings", None),
                **view.stats(),  # delta, delta_rows, tombstones, hidden_base_rows
            )
        return body


def _digest(transform: Transform | None) -> str | None:
    return None if transform is None else transform.digest
