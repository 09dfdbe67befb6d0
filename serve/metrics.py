"""Prometheus metrics of the Serve app, exported the way Ray exports every metric.

The metrics are ``ray.serve.metrics`` objects: Ray's metrics agent on each node serves them on
its Prometheus port (``ray start --metrics-export-port``; Ray prefixes every name with
``ray_``), and Serve adds ``deployment``, ``replica`` and ``application`` tags by itself. Metrics
are created lazily, once per replica process, because they only work inside a Ray worker.

What is measured, by whom:

- Ingress (``RequestMetrics`` middleware): requests by endpoint (the route template, so
  ``/images/{id}`` is one series) and status, and their latency; partial answers.
- ShardSearcher: per-shard search latency and rerank candidates, and gauges of the live index:
  version, rows, memory, delta rows (set when a poll or a write changed them, else every 10 s).
- RecallCanary (``serve.deployments.canary``): the live recall@k and its samples.
- Rebuilder: rebuilds by outcome and their duration, builds in flight, what garbage collection
  removed and the shards still waiting for it (``RebuilderMetrics``).

``SERIES`` names every series the app exports and every metric is made through ``make``, which
refuses a name missing there: the list stays whole, and the Grafana board
(``deploy/grafana/visual-search.json``) is checked against it and against a scrape of a running
app (``tests/test_cluster_ops.py``). The embed job's own series are ``pipelines.job_metrics``'s.

Structured logs: Serve stamps every log record emitted while a request is handled with that
request's id (``x-request-id``: taken from the client's header, or made up and returned in the
response header) and, with ``log_encoding: JSON`` in the serve config, writes one JSON object per
line. The middleware's line is the ingress's access log: one per HTTP request with endpoint,
status and latency (``ServeConfig.access_log``, on by default; ``log_requests``); Serve's own
access line is off in the ingress (it said the same again). The same request id follows the call
into the embedder and shard replicas, on Serve's access lines there (``access_log``: one per call
a replica answers, a cost that grows with the shards a query visits: ~6% of a shard replica's
CPU per call, measured with py-spy on this 2-core box; ``access_log: false`` turns both off).
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import Any

log = logging.getLogger("ray.serve")

PREFIX = "visual_search_"
LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 15000]
CANDIDATE_BOUNDARIES = [10, 50, 100, 200, 400, 800, 1600, 3200, 10000]
REBUILD_S_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200]

# Every series of the app (names without PREFIX) -> the ray.serve.metrics class that makes it.
SERIES = {
    "requests": "Counter",
    "request_latency_ms": "Histogram",
    "partial_answers": "Counter",
    "shards_missing": "Counter",
    "shard_search_latency_ms": "Histogram",
    "shard_candidates": "Histogram",
    "index_version": "Gauge",
    "index_rows": "Gauge",
    "index_memory_bytes": "Gauge",
    "delta_rows": "Gauge",
    "delta_indexed_rows": "Gauge",
    "canary_recall_at_k": "Gauge",
    "canary_samples": "Counter",
    "canary_dropped": "Counter",
    "canary_failed": "Counter",
    "rebuilds": "Counter",
    "rebuild_duration_s": "Histogram",
    "rebuilds_running": "Gauge",
    "gc_removed": "Counter",
    "gc_pending_shards": "Gauge",
}


def make(name: str, description: str, **options: Any) -> Any:
    """The ``ray.serve.metrics`` metric ``PREFIX + name`` of ``SERIES`` (KeyError otherwise)."""
    from ray.serve import metrics

    return getattr(metrics, SERIES[name])(PREFIX + name, description=description, **options)


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = make(
            "requests",
            "HTTP requests by endpoint (route template), method and status code.",
            tag_keys=("endpoint", "method", "status"),
        )
        self.latency_ms = make(
            "request_latency_ms",
            "HTTP request latency in the ingress, in milliseconds.",
            boundaries=LATENCY_MS_BOUNDARIES,
            tag_keys=("endpoint", "method"),
        )
        self.partial = make(
            "partial_answers",
            "Search answers that left out at least one shard (partial: true).",
        )
        self.shards_missing = make(
            "shards_missing",
            "Shards left out of answers, by shard and reason (timeout, error).",
            tag_keys=("shard", "reason"),
        )

    def observe_request(self, endpoint: str, method: str, status: int, ms: float) -> None:
        tags = {"endpoint": endpoint, "method": method}
        self.requests.inc(tags={**tags, "status": str(status)})
        self.latency_ms.observe(ms, tags=tags)

    def observe_answer(self, missing: dict[int, str]) -> None:
        if missing:
            self.partial.inc()
        for shard, reason in missing.items():
            self.shards_missing.inc(tags={"shard": str(shard), "reason": _reason_tag(reason)})


class SearcherMetrics:
    def __init__(self) -> None:
        self.search_ms = make(
            "shard_search_latency_ms",
            "Search time of one query inside a shard replica, in milliseconds.",
            boundaries=LATENCY_MS_BOUNDARIES,
            tag_keys=("shard",),
        )
        self.candidates = make(
            "shard_candidates",
            "Candidates taken from the IVF+PQ index per query for rerank.",
            boundaries=CANDIDATE_BOUNDARIES,
            tag_keys=("shard",),
        )
        self.version = make(
            "index_version",
            "Live index version a shard replica serves.",
            tag_keys=("shard",),
        )
        self.rows = make("index_rows", "Rows in the live index.", tag_keys=("shard",))
        self.memory = make(
            "index_memory_bytes",
            "Memory of the live index (codes, ids, lists).",
            tag_keys=("shard",),
        )
        self.delta = make(
            "delta_rows",
            "Rows of the shard not yet in its live index (scanned, or in indexed delta blocks).",
            tag_keys=("shard",),
        )
        self.delta_indexed = make(
            "delta_indexed_rows",
            "Delta rows frozen into indexed blocks (searched through HNSW, not scanned).",
            tag_keys=("shard",),
        )

    def observe_search(self, shard: int, ms: float, candidates: int | None) -> None:
        tags = {"shard": str(shard)}
        self.search_ms.observe(ms, tags=tags)
        if candidates:
            self.candidates.observe(candidates, tags=tags)

    def publish(self, stats: dict[str, Any]) -> None:
        """Gauges from a ShardSearcher ``stats()`` body."""
        tags = {"shard": str(stats["shard"])}
        if stats.get("version") is not None:
            self.version.set(stats["version"], tags=tags)
        self.rows.set(stats.get("count") or 0, tags=tags)
        self.memory.set(stats.get("memory_bytes") or 0, tags=tags)
        delta = stats.get("delta")
        if isinstance(delta, dict):
            delta = delta.get("rows", delta.get("count"))
        self.delta.set(delta or 0, tags=tags)
        self.delta_indexed.set(stats.get("delta_frozen_rows") or 0, tags=tags)


class RebuilderMetrics:
    """The Rebuilder's: how rebuilds ended and how long they took, how many run, and what garbage
    collection removed and still waits for. Tags stay small and bounded (an outcome of three, a
    kind of two); which shard did what is in ``GET /admin/rebuild``, and the board shows each
    shard's version from the searchers' gauges."""

    def __init__(self) -> None:
        self.rebuilds = make(
            "rebuilds",
            "Rebuilds finished, by outcome: built (a version committed), unchanged (up to date "
            "or superseded), failed (the live version kept serving).",
            tag_keys=("outcome",),
        )
        self.duration_s = make(
            "rebuild_duration_s",
            "Rebuild time from launch to end in seconds (waiting for the task's resources too).",
            boundaries=REBUILD_S_BOUNDARIES,
            tag_keys=("outcome",),
        )
        self.running = make("rebuilds_running", "Rebuild tasks in flight.")
        self.gc_removed = make(
            "gc_removed",
            "What garbage collection deleted, by kind: version (an old index version) or part "
            "(a Parquet or tombstone part a live version folded in).",
            tag_keys=("kind",),
        )
        self.gc_pending = make(
            "gc_pending_shards",
            "Shards whose garbage still waits (grace period, a lease, a running build).",
        )

    def observe_rebuild(self, summary: dict[str, Any], seconds: float) -> None:
        tags = {"outcome": rebuild_outcome(summary)}
        self.rebuilds.inc(tags=tags)
        self.duration_s.observe(seconds, tags=tags)

    def observe_gc(self, summary: dict[str, Any]) -> None:
        """Counts from an ``index.storage.gc.collect_garbage`` summary."""
        for kind, n in (
            ("version", len(summary.get("versions") or ())),
            ("part", summary["parts"]),
        ):
            if n:
                self.gc_removed.inc(n, tags={"kind": kind})

    def publish(self, running: int, gc_pending: int) -> None:
        self.running.set(running)
        self.gc_pending.set(gc_pending)


def rebuild_outcome(summary: dict[str, Any]) -> str:
    if summary.get("error"):
        return "failed"
    return "built" if summary.get("built") else "unchanged"


@cache
def ingress_metrics() -> IngressMetrics:
    return IngressMetrics()


@cache
def searcher_metrics() -> SearcherMetrics:
    return SearcherMetrics()


@cache
def rebuilder_metrics() -> RebuilderMetrics:
    return RebuilderMetrics()


def _reason_tag(reason: str) -> str:
    """A bounded tag value from scatter's reason ("timeout" or "error: <Type>: <message>")."""
    return "timeout" if str(reason).startswith("timeout") else "error"


def _endpoint(scope: dict) -> str:
    """The matched route's template (``/images/{id}``), never the raw path: bounded cardinality."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestMetrics:
    """ASGI middleware of the ingress app: count, time and log every request it answers.

    A plain ASGI wrapper rather than ``@app.middleware("http")`` (Starlette's
    BaseHTTPMiddleware), which runs every request through an extra task and in-memory streams
    for the response body: a fixed cost on each query's path for nothing we use.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception that escapes the app becomes a 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _record(scope, status, (time.perf_counter() - start) * 1000)


_LOG_REQUESTS = [True]  # the ingress's access_log setting (log_requests), per process


def log_requests(enabled: bool) -> None:
    """Whether the middleware logs its line per request in this process (the ingress sets it
    from ``ServeConfig.access_log``); counts and latencies are recorded either way."""
    _LOG_REQUESTS[0] = bool(enabled)


def _record(scope: dict, status: int, ms: float) -> None:
    endpoint = _endpoint(scope)  # the router wrote the matched route into the shared scope
    method = scope.get("method", "")
    try:
        ingress_metrics().observe_request(endpoint, method, status, ms)
    except Exception:  # metrics must never fail a request
        log.exception("recording request metrics failed")
    if not _LOG_REQUESTS[0]:
        return
    log.info(
        "%s %s -> %d in %.1f ms",
        method,
        endpoint,
        status,
        ms,
        extra={"endpoint": endpoint, "status": status, "latency_ms": round(ms, 3)},
    )
