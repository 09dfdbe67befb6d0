"""The live recall canary: how much of the exact top-k the served answers hold, measured live.

Offline benchmarks say what recall a version had when it was built; a rebuild with a worse
quantizer, a drift of the data away from the trained centroids or a misconfigured ``nprobe``
shows only here. The ingress hands a sampled fraction (``canary_fraction``) of the searches it
answered in full (not partial ones) to the ``RecallCanary`` deployment, fire-and-forget: the
query vector, its ``k`` and the ids it served (before any answer shaping: the canary measures
the index, not the shaping). The canary recomputes each one exactly, in the background and off
the request path, by asking every shard group for its brute-force top-k
(``ShardSearcher.search_exact``: base rows not hidden + delta rows, exactly what ``search``
would return from a perfect index), and keeps recall@k = |served & exact| / |exact| over the last
``canary_window`` samples.

CPU is bounded twice: at most ``canary_max_per_s`` recomputations a second (each is a scan of
every vector of every shard, in the searcher replicas), and a queue of ``canary_queue`` samples
past which new samples are dropped (counted), never queued without bound.

Exported as the Prometheus gauge ``visual_search_canary_recall_at_k`` (the window's mean; Ray
prefixes ``ray_``) with counters of samples, drops and failures, and in ``GET /stats`` under
``canary``. A sample whose catalogue changed between the answer and the recomputation (a write,
a swap) can score below 1 for that reason alone; with a window of hundreds it is noise.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from index.query.hits import Hit
from index.query.merge import merge_topk
from serve.metrics import make
from serve.scatter import gather_with_deadline

log = logging.getLogger("ray.serve")


def recall_at_k(served: list[str], exact: list[str]) -> float | None:
    """|served & exact| / |exact| (None when the exact answer is empty: nothing to miss)."""
    if not exact:
        return None
    return len(set(served) & set(exact)) / len(exact)


class RecallWindow:
    """The recall of the last ``size`` samples; ``mean`` is what the gauge shows."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.values: deque[float] = deque(maxlen=size)

    def add(self, recall: float) -> None:
        self.values.append(float(recall))

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    def __len__(self) -> int:
        return len(self.values)


class CanaryMetrics:
    def __init__(self) -> None:
        self.recall = make(
            "canary_recall_at_k",
            "Recall@k of sampled live answers against exact search (window mean).",
        )
        self.samples = make("canary_samples", "Live answers the canary recomputed exactly.")
        self.dropped = make(
            "canary_dropped", "Sampled answers dropped because the canary's queue was full."
        )
        self.failed = make(
            "canary_failed", "Recomputations that failed or lacked a shard group (not counted)."
        )


@serve.deployment(name="RecallCanary")
class RecallCanary:
    """Recomputes sampled answers exactly, one at a time, at most ``max_per_s`` a second."""

    def __init__(
        self,
        searchers: list[DeploymentHandle],
        metric: str,
        window: int = 200,
        max_per_s: float = 0.5,
        queue: int = 16,
        deadline_s: float = 60.0,
    ) -> None:
        self.searchers = searchers
        self.metric = metric
        self.window = RecallWindow(window)
        self.min_interval_s = 1.0 / max_per_s
        self.queue_size = queue
        self.deadline_s = deadline_s
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.sampled = self.recomputed = self.dropped = self.failed = 0
        self.last_recall: float | None = None
        self.exact_ms: deque[float] = deque(maxlen=window)
        self._metrics: CanaryMetrics | None = None

    def _metrics_or_none(self) -> CanaryMetrics | None:
        if self._metrics is None:
            try:
                self._metrics = CanaryMetrics()
            except Exception:  # outside a Ray worker (unit tests): no export
                return None
        return self._metrics

    def _start(self) -> asyncio.Queue:
        """The queue and its worker, on the replica's event loop (made on the first sample)."""
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self.queue_size)
            self._worker = asyncio.get_running_loop().create_task(self._run())
        return self._queue

    async def observe(self, vector: np.ndarray, k: int, served: list[str]) -> bool:
        """Take one sampled answer; False when the queue is full (the sample is dropped)."""
        queue = self._start()
        self.sampled += 1
        try:
            queue.put_nowait((np.asarray(vector, np.float32), int(k), list(served)))
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            metrics = self._metrics_or_none()
            if metrics is not None:
                metrics.dropped.inc()
            return False

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            vector, k, served = await self._queue.get()
            wait = next_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # pacing: the CPU bound, not synchronisation
            next_at = time.monotonic() + self.min_interval_s
            try:
                await self._recompute(vector, k, served)
            except Exception:  # the canary must never stop on one bad sample
                log.exception("canary: recomputing a sample failed")
                self.failed += 1

    async def _recompute(self, vector: np.ndarray, k: int, served: list[str]) -> None:
        started = time.perf_counter()
        gathered = await gather_with_deadline(
            {
                g: (lambda h=h: h.search_exact.remote(vector, k))
                for g, h in enumerate(self.searchers)
            },
            self.deadline_s,
        )
        metrics = self._metrics_or_none()
        if gathered.missing:  # an incomplete exact answer would make up misses
            self.failed += 1
            if metrics is not None:
                metrics.failed.inc()
            return
        per_group = [
            [Hit(i, "", s, sh) for i, s, sh in zip(a["ids"], a["scores"], a["shards"], strict=True)]
            for _, a in sorted(gathered.answers.items())
        ]
        exact = [h.id for h in merge_topk(per_group, k, self.metric)]
        recall = recall_at_k(served[:k], exact)
        self.exact_ms.append((time.perf_counter() - started) * 1000)
        if recall is None:
            return
        self.recomputed += 1
        self.last_recall = recall
        self.window.add(recall)
        if metrics is not None:
            metrics.samples.inc()
            metrics.recall.set(self.window.mean)

    async def stats(self) -> dict:
        """What ``GET /stats`` shows under ``canary``."""
        return {
            "recall_at_k": self.window.mean,
            "window": len(self.window),
            "window_size": self.window.values.maxlen,
            "last_recall": self.last_recall,
            "sampled": self.sampled,
            "recomputed": self.recomputed,
            "dropped": self.dropped,
            "failed": self.failed,
            "queued": 0 if self._queue is None else self._queue.qsize(),
            "exact_ms_p50": float(np.median(self.exact_ms)) if self.exact_ms else None,
            "max_per_s": 1.0 / self.min_interval_s,
        }


def hand_to_canary(
    canary: DeploymentHandle | None,
    fraction: float,
    vector: np.ndarray,
    k: int,
    hits: list[Hit],
    missing: list[dict],
) -> None:
    """The ingress's side: hand a sampled (``fraction``), fully answered search (its unshaped
    top ``k``) to the recall canary; never waits for it, never fails the search."""
    if canary is None or missing or random.random() >= fraction:
        return
    try:
        canary.observe.remote(vector, k, [h.id for h in hits[:k]])
    except Exception:  # the canary must never fail a search
        log.exception("handing a sample to the recall canary failed")
