"""What a caller may ask for: the request limits, and the lower caps of anonymous callers.

A keyed caller (``serve.http.security``) may ask ``nprobe``, ``candidates`` and image pixels up to
the config's ``max_*``, ``k`` up to ``MAX_K``, filters of up to ``index.query.filters.MAX_NODES``
nodes, and shaping pools (dedup, diversify) of up to ``MAX_K`` merged hits; a caller without the
key only up to the ``anon_max_*`` caps. Those caps bound what one anonymous request costs: each
filter node is a pass over every row of every shard, a batch of searches runs at its members'
largest ``k``, and dedup compares every pair of its pool in Python (and regrows it). A refusal by
those caps names the cap and says that the key lifts it (``Limits.hint``); the shaping pool is not
asked for by name, so its cap only bounds it (a dedup answer may hold fewer than ``k`` groups).
"""

from __future__ import annotations

from dataclasses import dataclass

from index.query.filters import MAX_NODES
from serve.config import MAX_K, ServeConfig


@dataclass
class Limits:
    default_k: int = 10
    default_nprobe: int | None = None
    default_candidates: int | None = None
    max_nprobe: int = 65536
    max_candidates: int = 10000
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_k: int = MAX_K
    max_filter_nodes: int = MAX_NODES
    max_shape_pool: int = MAX_K  # merged hits answer shaping may fetch and compare
    hint: str = ""  # appended to a refusal by these caps (anonymous callers: the key lifts them)

    def over(self, text: str) -> str:
        """A refusal's text by these caps, with the hint."""
        return f"{text} ({self.hint})" if self.hint else text


def limits_for(config: ServeConfig, keyed: bool) -> Limits:
    """The request limits of a keyed or an anonymous caller."""
    limits = Limits(
        default_k=config.default_k,
        default_nprobe=config.default_nprobe,
        default_candidates=config.default_candidates,
        max_nprobe=config.max_nprobe,
        max_candidates=config.max_candidates,
        max_upload_bytes=config.max_upload_bytes,
        max_pixels=config.max_pixels,
    )
    if keyed:
        return limits
    lowered = (
        (config.anon_max_nprobe, config.max_nprobe),
        (config.anon_max_candidates, config.max_candidates),
        (config.anon_max_pixels, config.max_pixels),
        (config.anon_max_k, MAX_K),
        (config.anon_max_filter_nodes, MAX_NODES),
        (config.anon_max_shape_pool, MAX_K),
    )
    (
        limits.max_nprobe,
        limits.max_candidates,
        limits.max_pixels,
        limits.max_k,
        limits.max_filter_nodes,
        limits.max_shape_pool,
    ) = (min(a, m) for a, m in lowered)
    # a caller who names no k is never refused: the default is cut to the cap
    limits.default_k = min(limits.default_k, limits.max_k)
    if any(a < m for a, m in lowered):
        limits.hint = "the cap for callers without the API key; the key raises it"
    return limits
