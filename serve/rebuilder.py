"""Rebuilder: the one place that decides when a shard is rebuilt, and launches the Ray task.

One replica (never more: two deciders would launch duplicate builds) watches every shard's delta
(``pipelines.rebuild.pending``: rows in parts the live version does not cover, plus tombstones it
did not apply) every ``rebuild_check_s`` and launches ``pipelines.rebuild.rebuild_shard`` as a
Ray task (``rebuild_num_cpus`` CPUs, outside every serving replica) when the delta reaches
``rebuild_delta_rows`` rows or ``rebuild_delta_fraction`` of the shard's built rows.
``POST /admin/rebuild`` asks for one at once (``request``). At most one build per shard runs;
a request while one runs is queued and runs right after it. After a build, and on every check,
old versions are garbage-collected (``pipelines.rebuild.collect_garbage``, grace
``rebuild_gc_grace_s``). The task commits the manifest itself; searchers poll it and swap.
"""

from __future__ import annotations

import logging
import threading
import time

import pyarrow.parquet as pq
import ray
from ray import serve

from index.manifest import load_manifest
from index.store import Store
from pipelines.rebuild import RebuildOptions, collect_garbage, live_meta, pending, rebuild_shard
from serve.config import ServeConfig

log = logging.getLogger("ray.serve")


@serve.deployment(name="Rebuilder", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Rebuilder:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.store = Store(config.store)
        self.num_shards = load_manifest(self.store).num_shards
        self._lock = threading.Lock()
        self._running: dict[int, tuple[ray.ObjectRef, float, str]] = {}  # shard -> ref, t, why
        self._queued: dict[int, str] = {}
        self._rows: dict[str, int] = {}  # part -> rows (parts are immutable)
        self.history: list[dict] = []
        self.last_error: str | None = None
        self._task = ray.remote(rebuild_shard).options(
            num_cpus=config.rebuild_num_cpus, name="rebuild-shard"
        )
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True, name="rebuilder").start()

    def _options(self, force: bool) -> RebuildOptions:
        c = self.config
        return RebuildOptions(
            memory_budget=c.rebuild_memory_budget,
            force=force,
            drift_ratio=c.rebuild_drift_ratio,
            grace_s=c.rebuild_gc_grace_s,
            threads=c.rebuild_threads,
        )

    # ---- deciding -----------------------------------------------------------------------------
    def delta_of(self, shard: int) -> dict:
        """Rows and tombstone parts the live version of ``shard`` does not cover."""
        todo = pending(self.store, shard, live_meta(self.store, shard) or {})
        rows = 0
        for part in todo["parts"]:
            if part not in self._rows:
                meta = pq.read_metadata(self.store.path(part), filesystem=self.store.fs)
                self._rows[part] = meta.num_rows
            rows += self._rows[part]
        return {
            "rows": rows,
            "parts": len(todo["parts"]),
            "tombstone_parts": len(todo["tombstone_parts"]),
            "base_count": todo["base_count"],
        }

    def _due(self, delta: dict) -> str | None:
        c = self.config
        size = delta["rows"] + delta["tombstone_parts"]
        if size == 0:
            return None
        if c.rebuild_delta_rows and size >= c.rebuild_delta_rows:
            return f"delta {size} >= {c.rebuild_delta_rows} rows"
        if c.rebuild_delta_fraction and size >= c.rebuild_delta_fraction * delta["base_count"]:
            return f"delta {size} >= {c.rebuild_delta_fraction:.0%} of {delta['base_count']}"
        return None

    def _launch(self, shard: int, why: str, force: bool) -> None:
        ref = self._task.remote(self.store.uri, shard, self._options(force))
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
            self.history = [*self.history[-49:], summary]
            if shard in self._queued:
                self._launch(shard, self._queued.pop(shard), force=True)

    def _check(self, automatic: bool) -> None:
        with self._lock:
            self._reap()
            for shard in range(self.num_shards):
                if automatic and shard not in self._running:
                    why = self._due(self.delta_of(shard))
                    if why:
                        self._launch(shard, why, force=False)
                if shard not in self._running:
                    collect_garbage(self.store, shard, self.config.rebuild_gc_grace_s)

    def _loop(self) -> None:
        automatic = self.config.rebuild_check_s > 0
        interval = self.config.rebuild_check_s if automatic else 1.0
        while not self._stop.wait(min(interval, 1.0)):
            try:
                self._check(automatic and self._tick(interval))
                self.last_error = None
            except Exception as e:  # keep deciding; the next check retries
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("rebuilder check failed: %s", self.last_error)

    _last_auto = 0.0

    def _tick(self, interval: float) -> bool:
        now = time.monotonic()
        if now - self._last_auto >= interval:
            self._last_auto = now
            return True
        return False

    # ---- requests -----------------------------------------------------------------------------
    def request(self, shards: list[int] | None = None, force: bool = True) -> dict:
        """Rebuild ``shards`` (default: all) now; one already running gets a follow-up queued."""
        shards = list(range(self.num_shards)) if shards is None else shards
        started, queued = [], []
        with self._lock:
            self._reap()
            for shard in shards:
                if not 0 <= shard < self.num_shards:
                    raise ValueError(f"shard {shard} out of range 0..{self.num_shards - 1}")
                if shard in self._running:
                    self._queued[shard] = "requested (queued after the running build)"
                    queued.append(shard)
                else:
                    self._launch(shard, "requested", force=force)
                    started.append(shard)
        return {"started": started, "queued": queued}

    def status(self) -> dict:
        with self._lock:
            self._reap()
            running = {s: {"since": t, "trigger": why} for s, (_, t, why) in self._running.items()}
            return {
                "running": running,
                "queued": dict(self._queued),
                "history": list(self.history),
                "error": self.last_error,
                "thresholds": {
                    "rows": self.config.rebuild_delta_rows,
                    "fraction": self.config.rebuild_delta_fraction,
                    "check_s": self.config.rebuild_check_s,
                },
            }

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
