"""Prometheus metrics of the jobs: the embed job's throughput, exported the way Ray exports any.

The serving app's series are ``serve.metrics``'s; a job runs outside Serve, so its metrics are
``ray.util.metrics`` objects, recorded where the work happens: in the model actors of the embed
job (``pipelines.embed_stages.EmbedBatch``), one update per model batch. Ray's metrics agent on
the actor's node exports them (``ray_`` prefixed, counters with ``_total``), and keeps a counter's
value after its actor exits with the job, so a job's totals stay scrapeable and
``rate(ray_visual_search_embed_images_total[...])`` is the job's images/s while it runs.

Tags are few and bounded: the backbone's name (a handful) and an outcome of two. Errors count
every failed input the actors see, read and decode failures passed through included (``--dedup``
runs record their read failures before the actors, uncounted here).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "visual_search_"
# Every series of the jobs (names without PREFIX) -> the ray.util.metrics class that makes it.
SERIES = {"embed_images": "Counter", "embed_model_seconds": "Counter"}


class EmbedMetrics:
    def __init__(self, model: str) -> None:
        from ray.util.metrics import Counter

        self.model = model
        self.images = Counter(
            PREFIX + "embed_images",
            description="Images the embed job's model actors handled, by outcome: embedded "
            "(a vector) or error (an error row in the store).",
            tag_keys=("model", "outcome"),
        )
        self.model_seconds = Counter(
            PREFIX + "embed_model_seconds",
            description="Seconds the embed job's actors spent in the model (rate: busy actors).",
            tag_keys=("model",),
        )

    def observe_batch(self, embedded: int, errors: int, model_seconds: float) -> None:
        for outcome, n in (("embedded", embedded), ("error", errors)):
            if n:
                self.images.inc(n, tags={"model": self.model, "outcome": outcome})
        if model_seconds > 0:
            self.model_seconds.inc(model_seconds, tags={"model": self.model})


def embed_metrics(model: str) -> EmbedMetrics | None:
    """The actor's metrics, or None where they cannot be made (metrics never fail a job)."""
    try:
        return EmbedMetrics(model)
    except Exception:
        log.warning("embed job metrics unavailable", exc_info=True)
        return None


def record(metrics: EmbedMetrics | None, **counts: Any) -> None:
    if metrics is None:
        return
    try:
        metrics.observe_batch(**counts)
    except Exception:  # outside a Ray worker, or an exporter hiccup: the batch goes on
        log.debug("recording embed job metrics failed", exc_info=True)
