"""Answer shaping: better lists from the same catalogue, above the index.

The index already returns what exact search would, so what is left to improve lies in how the
query is formed and how the answer list is shaped. These are pure functions over a merged hit
list and the hits' vectors (no Ray, no FAISS), so the ingress, the benchmarks and the tests run
the same arithmetic:

- ``expanded_query``: average query expansion (AQE / alpha-QE, Radenovic et al.): the query plus
  its top-``m`` results, each weighted by ``max(score, 0) ** alpha`` (``alpha = 0`` is the plain
  mean), normalised; the caller searches again with it. Measured defaults (``EXPAND_M``,
  ``EXPAND_ALPHA``) come from ``benchmarks/quality.py`` on Caltech-101.
- ``collapse``: near-duplicate collapse. In rank order each hit either starts a group or joins
  the first (best) group whose head it matches at similarity >= ``threshold``; a group answers
  with its head and the ids it swallowed, so three crops of one photo take one slot, not three.
- ``mmr``: maximal marginal relevance (Carbonell & Goldstein): greedily pick the hit maximising
  ``lam * relevance - (1 - lam) * max similarity to those already picked``; ``lam = 1`` is the
  plain ranking.
- ``drop_self``: the query itself is not an answer: an id query drops that id; an image or vector
  query drops hits whose vector is the query's (score >= ``SELF_SCORE``, float16 rounding aside,
  in the first search: ``self_ids_of``).
- ``at_least``: hits whose score passes ``min_score``.

``shape`` applies them in that documented order: min_score, exclude_self, dedup, diversify, top
``k``. Scores are similarities for the ``"ip"`` metric (higher is better) and squared L2
distances for ``"l2"`` (lower is better); every threshold follows the metric's direction
(``min_score``/``dedup`` are the largest distances kept/collapsed for ``"l2"``).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from index.query.hits import Hit

# Read off benchmarks/quality.py's sweeps by its written rules (``choose_defaults``; figures in
# results/quality.json and the README): exact search of EfficientNet-Lite0 vectors, Caltech-101
# test vs train, and the demo set of several edits per photo.
EXPAND_M = 10  # best mAP@100 (0.754 vs 0.703 plain; m 3: 0.750, 20 not tried)
EXPAND_ALPHA = 0.0  # the plain mean: alpha > 0 lost mAP at every m here
DIVERSIFY_LAMBDA = 0.9  # MMR costs Caltech P@10 fast (0.8: -0.026); at 0.9 it still changes little
DEDUP_THRESHOLD = 0.8  # Caltech P@10 -0.009; demo set 5.9 distinct photos in the top-10, not 1.9
SELF_SCORE = 0.999  # an ip score this close to 1 is the query's own vector (float16 rounding)
SELF_DISTANCE = 1e-3  # the same for l2 stores: squared distance this small
POOL_FACTOR = 4  # dedup/diversify choose k from this many times k merged hits
POOL_MIN_EXTRA = 20  # ... and at least k + this many

MAX_EXPAND_M = 100
MAX_EXPAND_ALPHA = 10.0


@dataclass(frozen=True)
class ShapeOptions:
    """The answer-shaping options of one query; all off by default (``active`` is False)."""

    expand: bool = False
    expand_m: int = EXPAND_M
    expand_alpha: float = EXPAND_ALPHA
    diversify: float | None = None  # MMR lambda in [0, 1]; None = off
    dedup: float | None = None  # similarity threshold; None = off
    exclude_self: bool = False
    min_score: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.expand_m <= MAX_EXPAND_M:
            raise ValueError(f"expand_m must be in 1..{MAX_EXPAND_M}, got {self.expand_m}")
        if not 0.0 <= self.expand_alpha <= MAX_EXPAND_ALPHA:
            raise ValueError(f"expand_alpha must be in 0..{MAX_EXPAND_ALPHA}")
        if self.diversify is not None and not 0.0 <= self.diversify <= 1.0:
            raise ValueError(f"diversify (MMR lambda) must be in 0..1, got {self.diversify}")
        if self.dedup is not None and not math.isfinite(self.dedup):
            raise ValueError("dedup threshold must be finite")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise ValueError("min_score must be finite")

    @property
    def active(self) -> bool:
        return self.expand or self.needs_vectors or self.exclude_self or self.min_score is not None

    @property
    def needs_vectors(self) -> bool:
        """Dedup and MMR compare hits with each other: they need the hits' vectors."""
        return self.diversify is not None or self.dedup is not None

    def fetch_k(self, k: int, limit: int) -> int:
        """How many merged hits to take from the shards so ``k`` survive the shaping."""
        fetch = k
        if self.needs_vectors:
            fetch = max(fetch, k * POOL_FACTOR, k + POOL_MIN_EXTRA)
        if self.exclude_self:
            fetch = max(fetch, k + 1)
        if self.expand:
            fetch = max(fetch, self.expand_m)
        return min(fetch, limit)


@dataclass(frozen=True)
class Shaped:
    """A hit of the shaped answer; ``collapsed``: ids of near-duplicates it stands for."""

    hit: Hit
    collapsed: tuple[str, ...] = field(default_factory=tuple)


def _check_metric(metric: str) -> None:
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")


def _better_or_equal(score: float, threshold: float, metric: str) -> bool:
    return score >= threshold if metric == "ip" else score <= threshold


def _similarity(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Pairwise similarity (higher = closer): inner product, or minus the squared distance."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    dots = a @ b.T
    if metric == "ip":
        return dots
    return -np.maximum(
        np.square(a).sum(axis=1)[:, None] - 2 * dots + np.square(b).sum(axis=1)[None, :], 0
    )


def expanded_query(
    query: np.ndarray,
    neighbours: np.ndarray,
    scores: np.ndarray | list[float],
    alpha: float = EXPAND_ALPHA,
    metric: str = "ip",
) -> np.ndarray:
    """The query averaged with its top results (``neighbours``: their vectors, best first).

    ``"ip"``: ``normalise(q + sum_i max(s_i, 0) ** alpha * x_i)`` (alpha-QE; alpha 0 = AQE).
    ``"l2"``: the plain mean of the query and the neighbours (distances give no weights).
    """
    _check_metric(metric)
    q = np.asarray(query, np.float32).reshape(-1)
    x = np.asarray(neighbours, np.float32).reshape(-1, q.shape[0])
    if len(x) == 0:
        return q.copy()
    if metric == "l2":
        return ((q + x.sum(axis=0)) / (len(x) + 1)).astype(np.float32)
    weights = np.maximum(np.asarray(scores, np.float32)[: len(x)], 0.0) ** np.float32(alpha)
    out = q + weights @ x
    norm = float(np.linalg.norm(out))
    return (out / norm).astype(np.float32) if norm > 0 else q.copy()


def at_least(hits: list[Hit], min_score: float, metric: str) -> list[Hit]:
    """Hits at least as good as ``min_score`` (a similarity floor, or a distance ceiling)."""
    _check_metric(metric)
    return [h for h in hits if _better_or_equal(h.score, min_score, metric)]


def self_ids_of(hits: list[Hit], metric: str) -> set[str]:
    """Ids of hits whose score says they *are* the query's vector (an image or vector query of a
    catalogue picture): ``SELF_SCORE`` for ``ip``, ``SELF_DISTANCE`` for ``l2``. Taken from the
    first search, before any expansion moves the query away from its own vector."""
    _check_metric(metric)
    same = SELF_SCORE if metric == "ip" else SELF_DISTANCE
    return {h.id for h in hits if _better_or_equal(h.score, same, metric)}


def drop_self(hits: list[Hit], metric: str, self_ids: Collection[str] | None = None) -> list[Hit]:
    """Without the query itself: the ids in ``self_ids`` (an id query's own id, or
    ``self_ids_of`` the first search), else the hits whose score says they are the query."""
    ids = self_ids_of(hits, metric) if self_ids is None else set(self_ids)
    return [h for h in hits if h.id not in ids]


def collapse(
    hits: list[Hit], vectors: np.ndarray, threshold: float, metric: str = "ip"
) -> tuple[list[int], list[list[int]]]:
    """Group near-duplicates: ``(heads, members)``, positions into ``hits`` (rank order kept).

    A hit joins the first head it matches at ``threshold`` (similarity >= threshold for ``ip``,
    squared distance <= threshold for ``l2``); a head is the best-ranked member of its group.
    """
    _check_metric(metric)
    if not hits:
        return [], []
    sims = _similarity(vectors, vectors, metric)
    limit = threshold if metric == "ip" else -threshold
    heads: list[int] = []
    members: list[list[int]] = []
    for i in range(len(hits)):
        for g, head in enumerate(heads):
            if sims[i, head] >= limit:
                members[g].append(i)
                break
        else:
            heads.append(i)
            members.append([])
    return heads, members


def mmr(hits: list[Hit], vectors: np.ndarray, k: int, lam: float, metric: str = "ip") -> list[int]:
    """Positions of the ``k`` hits MMR picks, in pick order (``lam`` 1 = the given ranking).

    Relevance is the hit's own score (``-distance`` for ``l2``), redundancy the largest
    similarity to a hit already picked; ties go to the better-ranked hit.
    """
    _check_metric(metric)
    n = min(k, len(hits))
    if n <= 0:
        return []
    relevance = np.array([h.score for h in hits], np.float64)
    if metric == "l2":
        relevance = -relevance
    sims = _similarity(vectors, vectors, metric).astype(np.float64)
    picked: list[int] = []
    redundancy = np.full(len(hits), -np.inf)
    free = np.ones(len(hits), bool)
    for _ in range(n):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        gain = lam * relevance - (1.0 - lam) * penalty
        gain[~free] = -np.inf
        best = int(np.argmax(gain))  # argmax: the first (best-ranked) of equal gains
        picked.append(best)
        free[best] = False
        redundancy = np.maximum(redundancy, sims[:, best])
    return picked


def shape(
    hits: list[Hit],
    k: int,
    options: ShapeOptions,
    metric: str = "ip",
    *,
    vectors: dict[str, np.ndarray] | None = None,
    self_ids: Collection[str] | None = None,
) -> list[Shaped]:
    """``hits`` (merged, best first) shaped by ``options`` into at most ``k`` answers.

    Order: min_score, exclude_self, dedup, diversify, top ``k``. ``vectors`` (id -> vector) are
    needed for dedup and diversify; a hit without a vector (deleted meanwhile) is dropped there.
    Query expansion happens before (the caller searches with ``expanded_query``).
    """
    _check_metric(metric)
    if options.min_score is not None:
        hits = at_least(hits, options.min_score, metric)
    if options.exclude_self:
        hits = drop_self(hits, metric, self_ids)
    if not options.needs_vectors:
        return [Shaped(h) for h in hits[:k]]
    vectors = vectors or {}
    pool = [h for h in hits if h.id in vectors]
    if not pool:
        return []
    matrix = np.stack([np.asarray(vectors[h.id], np.float32) for h in pool])
    heads, members = list(range(len(pool))), [[] for _ in pool]
    if options.dedup is not None:
        heads, members = collapse(pool, matrix, options.dedup, metric)
    order = list(range(len(heads)))
    if options.diversify is not None:
        order = mmr([pool[i] for i in heads], matrix[heads], k, options.diversify, metric)
    return [Shaped(pool[heads[g]], tuple(pool[j].id for j in members[g])) for g in order[:k]]
