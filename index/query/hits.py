"""One search result. Its own module so the merge and its tests need no FAISS."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hit:
    """A row found by a search.

    ``score`` is the inner product (higher is better) for the ``"ip"`` metric and the squared L2
    distance (lower is better) for ``"l2"``: exact (from the stored float16 vectors) after rerank,
    the index's approximation without it. ``shard`` is filled in by ``ShardIndex.search``
    (-1 when unknown) so a gatherer can report where a hit came from.
    """

    id: str
    uri: str
    score: float
    shard: int = -1
    # the row's metadata columns that the search asked for (``fields``); None when none were
    # asked. Not part of equality: two hits of one row are the same hit whatever they carry.
    metadata: dict | None = field(default=None, compare=False)
    # the matched region's box (x0, y0, x1, y1 as fractions of the image) when the hit is an
    # image found through one of its region rows (``index.query.region_hits``); None: the whole
    region: tuple[float, float, float, float] | None = field(default=None, compare=False)
