"""What every search entry point accepts, checked in one place.

``ShardIndex`` (``search``, ``search_filtered``, ``search_exact``) and
``index.live.delta.LiveShard`` (``search``, ``search_with_plan``, ``search_exact``) all start
here, so a query batch is held to the same rules whichever path serves it: one vector or an
``(n, dim)`` array of finite numbers, and ``k >= 1``. A NaN or an infinity is refused rather
than searched: every score it touches is NaN or infinite, so which rows it returns would be
arbitrary (and would differ between the compressed index and the exact scan).

Both checks raise ``ValueError``; the HTTP layer (``serve``) refuses such requests with a 422
before they reach a shard, so here they guard every other caller (jobs, benchmarks, tests).
"""

from __future__ import annotations

import numpy as np


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """``queries`` as a C-contiguous float32 ``(n, dim)`` array (one vector becomes ``(1, dim)``);
    ``ValueError`` for another rank or width, or any NaN or infinity."""
    with np.errstate(over="ignore"):  # a float64 past float32's range becomes inf: refused below
        q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (n, {dim}), got shape {np.shape(queries)}")
    if not np.isfinite(q).all():
        raise ValueError("queries contain NaN or infinity")
    return np.ascontiguousarray(q)


def check_k(k: int) -> None:
    """``ValueError`` unless ``k >= 1``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
