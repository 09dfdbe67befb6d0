"""Rebuilder: the one place that decides when a shard is rebuilt, and launches the Ray task.

One replica (never more: two deciders would launch duplicate builds) plans every shard
(``index.storage.coverage``: rows in parts the live version does not cover, plus tombstone parts it
did not
apply) every ``rebuild_check_s`` and launches ``index.live.rebuild.rebuild_shard`` (the one build
path) as a Ray task when the delta reaches ``rebuild_delta_rows`` rows,
``rebuild_delta_fraction`` of the shard's built rows, ``rebuild_delta_bytes`` of vectors or
``rebuild_delta_parts`` parts (``rebuild_due``). The task asks for the memory the build
needs (``index.ann.policy.estimate_build_memory``) and, when the cluster has ``shard_host`` nodes,
runs on one (``rebuild_node_resource``), never inside a serving replica. ``POST /admin/rebuild``
asks for one at once (``request``; ``force`` rebuilds a shard that is up to date, ``retrain``
never reuses the quantizer; both off by default). At most one build per shard runs; a request
while one runs is queued and runs right after it. The task commits the manifest itself;
searchers poll it and swap.

Garbage collection (``index.storage.gc``) runs for a shard after its live version changes (a build
here,
or one committed by ``pipelines/build_index.py``) until it has nothing left to wait for: old
versions go once no searcher's lease names them and ``rebuild_gc_grace_s`` has passed, with the
parts and tombstones the new version folded in.

Metrics (``serve.metrics.RebuilderMetrics``): each finished rebuild by outcome and its duration,
what each GC pass removed, and, every tick, the builds in flight and the shards GC still waits
for: the board's Maintenance row.
"""

from __future__ import annotations

import logging
import threading
import time

import ray
from ray import serve

from index.ann.policy import build_memory_request
from index.live.rebuild import RebuildOptions, delta_rows, rebuild_shard
from index.storage.coverage import plan_shard
from index.storage.gc import collect_garbage
from index.storage.manifest import load_manifest
from index.units import parse_bytes
from serve.config import ServeConfig
from serve.metrics import RebuilderMetrics, rebuilder_metrics

log = logging.getLogger("ray.serve")


GC_INTERVAL_S = 5.0  # how often shards with garbage pending are looked at


def _metrics() -> RebuilderMetrics | None:
    try:
        return rebuilder_metrics()
    except Exception:  # outside a Serve replica (no export); metrics never stop the Rebuilder
        return None


def _largest_node_memory() -> float:
    return max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)


def rebuild_due(delta: dict, dim: int, c) -> str | None:
    """Why a shard whose delta is ``delta`` (``Rebuilder.delta_of``) should be rebuilt now, by
    ``c``'s ``rebuild_delta_*`` rules (a ``ServeConfig``; 0 turns a rule off), or None.

    Rows (and tombstone parts) against ``rebuild_delta_rows`` and ``rebuild_delta_fraction`` of
    the built rows; the rows' float32 vectors against ``rebuild_delta_bytes`` (every query scans
    them: a 1280-d delta costs five times a 256-d one per row); the parts against
    ``rebuild_delta_parts`` (a replica reads each when it starts: thousands of one-row parts
    under object-store faults kept one from serving for 273 s)."""
    size = delta["rows"] + delta["tombstone_parts"]
    if size == 0:
        return None
    if c.rebuild_delta_rows and size >= c.rebuild_delta_rows:
        return f"delta {size} >= {c.rebuild_delta_rows} rows"
    if c.rebuild_delta_fraction and size >= c.rebuild_delta_fraction * delta["base_count"]:
        return f"delta {size} >= {c.rebuild_delta_fraction:.0%} of {delta['base_count']}"
    budget = parse_bytes(c.rebuild_delta_bytes)
    if budget and delta["rows"] * dim * 4 >= budget:
        return f"delta {delta['rows']} x {dim}-d vectors >= {c.rebuild_delta_bytes}"
    parts = delta["parts"] + delta["tombstone_parts"]
    if c.rebuild_delta_parts and parts >= c.rebuild_delta_parts:
        return f"delta {parts} parts >= {c.rebuild_delta_parts}"
    return None


@serve.deployment(name="Rebuilder", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Rebuilder:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.store = config.open_store()
        manifest = load_manifest(self.store)
        self.num_shards = manifest.num_shards
        self.dim = manifest.dim
        self._lock = threading.Lock()
        self._running: dict[int, tuple[ray.ObjectRef, float, str]] = {}  # shard -> ref, t, why
        self._queued: dict[int, tuple[str, bool, bool]] = {}  # shard -> why, force, retrain
        self._rows: dict[str, int] = {}  # part -> rows (parts are immutable)
        self._live: dict[int, str | None] = {}  # live version dir last seen per shard
        self._live_seen: dict[int, float] = {}  # shard -> monotonic time that dir was first seen
        self._dirty: set[int] = set(range(self.num_shards))  # shards that may have garbage
        self.history: list[dict] = []
        self.gc_history: list[dict] = []
        self.last_error: str | None = None
        self._task = ray.remote(rebuild_shard)
        self._stop = threading.Event()
        # POST /admin/rebuild only queues here (never waits on a plan or a GC pass): the loop
        # launches the requests within a tick
        self._requests: list[tuple[int, bool, bool]] = []  # (shard, force, retrain)
        self._requests_lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._loop, daemon=True, name="rebuilder").start()

    def _options(self, force: bool, retrain: bool) -> RebuildOptions:
        c = self.config
        return RebuildOptions(
            memory_budget=c.rebuild_memory_budget,
            force=force,
            retrain=retrain,
            drift_ratio=c.rebuild_drift_ratio,
            threads=c.rebuild_threads,
        )

    # ---- deciding -----------------------------------------------------------------------------
    def delta_of(self, shard: int) -> dict:
        """Rows and tombstone parts the live version of ``shard`` does not cover."""
        plan = plan_shard(self.store, shard)
        return {
            "rows": delta_rows(self.store, plan, self._rows),
            "parts": len(plan.new_parts),
            "tombstone_parts": len(plan.new_tombstones),
            "base_count": (plan.meta or {}).get("count", 0),
        }

    def _due(self, delta: dict) -> str | None:
        return rebuild_due(delta, self.dim, self.config)

    def _placement(self) -> dict[str, float]:
        wanted = self.config.rebuild_node_resource
        if wanted == "auto":
            wanted = "shard_host" if ray.cluster_resources().get("shard_host") else ""
        return {wanted: 0.001} if wanted else {}

    def _launch(self, shard: int, why: str, force: bool, retrain: bool = False) -> None:
        plan = plan_shard(self.store, shard)
        rows = (plan.meta or {}).get("count", 0) + delta_rows(self.store, plan, self._rows)
        task = self._task.options(
            num_cpus=self.config.rebuild_num_cpus,
            memory=build_memory_request(rows, self.dim, _largest_node_memory()),
            resources=self._placement(),
            name=f"rebuild-shard-{shard}",
        )
        ref = task.remote(self.store, shard, self._options(force, retrain))
        self._running[shard] = (ref, time.time(), why)
        log.info("rebuild of shard %d started: %s", shard, why)

    def _reap(self) -> None:
        for shard, (ref, started, why) in list(self._running.items()):
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            del self._running[shard]
            try:
                summary = ray.get(ref)
            except Exception as e:  # a failed build leaves the live version serving
                summary = {"shard": shard, "built": False, "error": f"{type(e).__name__}: {e}"}
                log.error("rebuild of shard %d failed: %s", shard, e)
            summary.update(trigger=why, started_at=started, finished_at=time.time())
            if (metrics := _metrics()) is not None:
                metrics.observe_rebuild(summary, summary["finished_at"] - started)
            self.history = [*self.history[-49:], summary]
            self._dirty.add(shard)
            if shard in self._queued:
                self._launch(shard, *self._queued.pop(shard))

    _last_gc = 0.0

    def _collect(self) -> None:
        """Garbage-collect shards whose live version changed, until nothing is left to wait for
        (every ``GC_INTERVAL_S``: a shard waiting out its grace period costs a few requests)."""
        if time.monotonic() - self._last_gc < GC_INTERVAL_S:
            return
        self._last_gc = time.monotonic()
        manifest = load_manifest(self.store)
        for shard, state in manifest.shards.items():
            if self._live.get(shard, "unseen") != state.dir:
                self._live[shard] = state.dir
                self._live_seen[shard] = time.monotonic()
                self._dirty.add(shard)
        for shard in sorted(self._dirty):
            if shard in self._running:
                continue
            summary = collect_garbage(
                self.store,
                shard,
                self.config.rebuild_gc_grace_s,
                lease_ttl_s=self.config.lease_ttl_s,
                # the grace by this process's clock too, not only the committer's live_since
                seen_for_s=time.monotonic() - self._live_seen.get(shard, time.monotonic()),
            )
            if summary["versions"] or summary["parts"]:
                self.gc_history = [*self.gc_history[-49:], {"shard": shard, **summary}]
                log.info("shard %d: garbage collected %s", shard, summary)
                if (metrics := _metrics()) is not None:
                    metrics.observe_gc(summary)
            if summary["waiting"] is None:
                self._dirty.discard(shard)

    def _check(self, automatic: bool) -> None:
        with self._lock:
            self._reap()
            self._take_requests()
            if automatic:
                for shard in range(self.num_shards):
                    if shard not in self._running:
                        why = self._due(self.delta_of(shard))
                        if why:
                            self._launch(shard, why, force=False)
        # outside the lock: GET /admin/rebuild (status) never waits out a GC pass over the
        # store; only this thread launches builds, so none starts while it collects
        self._collect()

    def _loop(self) -> None:
        automatic = self.config.rebuild_check_s > 0
        interval = self.config.rebuild_check_s if automatic else 1.0
        while not self._stop.is_set():
            self._wake.wait(min(interval, 1.0))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._check(automatic and self._tick(interval))
                self.last_error = None
            except Exception as e:  # keep deciding; the next check retries
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("rebuilder check failed: %s", self.last_error)
            if (metrics := _metrics()) is not None:  # every tick: gauges go stale unrefreshed
                metrics.publish(len(self._running), len(self._dirty))

    _last_auto = 0.0

    def _tick(self, interval: float) -> bool:
        now = time.monotonic()
        if now - self._last_auto >= interval:
            self._last_auto = now
            return True
        return False

    # ---- requests -----------------------------------------------------------------------------
    def request(
        self, shards: list[int] | None = None, force: bool = False, retrain: bool = False
    ) -> dict:
        """Rebuild ``shards`` (default: all) now if they have anything to fold in (``force``:
        even if not); one already running gets a follow-up queued. Answers at once: the loop
        plans and launches within a tick (planning lists the store and reads a row count per
        new part, and the loop may be in a GC pass: seconds on an object store, which a request
        waited for before; the soak's timed-out rebuild requests)."""
        shards = list(range(self.num_shards)) if shards is None else shards
        for shard in shards:
            if not 0 <= shard < self.num_shards:
                raise ValueError(f"shard {shard} out of range 0..{self.num_shards - 1}")
        running = set(self._running)  # a snapshot, for the answer only
        with self._requests_lock:
            self._requests.extend((shard, force, retrain) for shard in shards)
        self._wake.set()
        return {
            "started": [s for s in shards if s not in running],
            "queued": [s for s in shards if s in running],
        }

    def _take_requests(self) -> None:
        """Launch the requested shards (holding ``_lock``); a running one gets a follow-up."""
        with self._requests_lock:
            requests, self._requests = self._requests, []
        for shard, force, retrain in requests:
            if shard in self._running:
                why = "requested (queued after the running build)"
                self._queued[shard] = (why, force, retrain)
            else:
                self._launch(shard, "requested", force=force, retrain=retrain)

    def status(self) -> dict:
        with self._lock:
            self._reap()
            running = {s: {"since": t, "trigger": why} for s, (_, t, why) in self._running.items()}
            return {
                "running": running,
                "queued": {s: q[0] for s, q in self._queued.items()},
                "history": list(self.history),
                "gc": list(self.gc_history),
                "error": self.last_error,
                "thresholds": {
                    "rows": self.config.rebuild_delta_rows,
                    "fraction": self.config.rebuild_delta_fraction,
                    "bytes": self.config.rebuild_delta_bytes,
                    "parts": self.config.rebuild_delta_parts,
                    "check_s": self.config.rebuild_check_s,
                },
            }

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self._wake.set()
