"""How one shard searches the rows a filter allows: exactly, or IVF+PQ with a selector and more
lists, chosen per query from where the matching rows are. Pure arithmetic, no FAISS.

An IVF search with an ``IDSelector`` skips the rows the filter rejects while it scans the
``nprobe`` lists nearest the query. At the nprobe tuned for unfiltered queries it finds the
true neighbours; with a filter that keeps a fraction ``s`` of the rows, the same lists hold
``s`` times fewer candidates, and recall collapses at low selectivity (LanceDB #2761; the fix
there was a minimum/maximum nprobe, lance #3903). So a filtered search raises nprobe by the
selectivity it measures, not globally but in the lists nearest this query:

1. ``allowed`` (the filter's mask, less deleted or superseded rows) counted per IVF list once
   per filter (``index.ann.ivf_lists.FilterMasks`` caches it);
2. the query's lists in order of centroid distance; nprobe = the fewest nearest lists that both
   hold ``SCAN_FACTOR`` times the rows an unfiltered search scans at the base nprobe
   (``nprobe * n / nlist``) and include ``LIST_FACTOR`` times the base nprobe lists that hold
   any allowed row; never fewer than the base nprobe, at most every list. For a filter
   independent of the vectors the first rule decides (``SCAN_FACTOR * nprobe / s``); for one
   correlated with them (a category that lives in a few clusters) the allowed rows sit in a
   few full lists, usually not the query's own, and the second one does: the query's filtered
   neighbours are farther than its unfiltered ones, and a far query needs more lists;
3. **exact** search over the allowed rows instead when that is cheaper than the scan it would
   replace: ``rows * EXACT_ROW_COST <= codes scanned`` (an exact row, read from the float16
   vectors and scored, costs about 64 fast-scan PQ codes, measured on 250k x 256,
   ``IVF1024,PQ128x4fsr``: 0.5 us per exact row vs 7.6 ns per scanned code). Exact search
   over few rows is also recall 1.0, and a filter that allows fewer than ``k`` rows returns
   them all.

``SCAN_FACTOR`` 2 and ``LIST_FACTOR`` 4 were measured (250k-row shards with uniform,
half-space and whole-list filters at 2-50 %, and ``benchmarks/filtered_search.py`` at 1M in 4
shards, 200 queries): uniform filters keep recall@10 >= 0.99 at ``SCAN_FACTOR`` 2 and gain
nothing above it; category filters keeping 10 % and 50 % of the rows were at 0.955 and 0.969
with the rows rule alone, 0.975 and 0.979 with the list rule (``LIST_FACTOR`` 4), which leaves
the uniform filters' nprobe as it was (the rows rule asks for more lists there). Doubling
``SCAN_FACTOR`` instead cost uniform filters twice the lists for no recall.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SCAN_FACTOR = 2.0
LIST_FACTOR = 4
EXACT_ROW_COST = 64


@dataclass(frozen=True)
class FilterPlan:
    """What a filtered search of one shard did (``ShardIndex.search_filtered`` returns it)."""

    method: str  # "exact", "ivf" or "none" (no row allowed)
    allowed: int  # rows the filter allows in the base version
    rows: int  # rows in the base version
    nprobe: int = 0  # lists scanned (ivf; the largest over the queries of a batch)
    scanned: int = 0  # codes in those lists (ivf)

    @property
    def selectivity(self) -> float:
        return self.allowed / self.rows if self.rows else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "selectivity": round(self.selectivity, 6)}


def ivf_nprobe(
    counts_in_order: np.ndarray, sizes_in_order: np.ndarray, base_nprobe: int, rows: int
) -> tuple[int, int]:
    """(nprobe, codes scanned) for one query: ``counts_in_order`` are the allowed rows of each
    list and ``sizes_in_order`` the rows, both in the query's nearest-first list order."""
    nlist = len(counts_in_order)
    base_nprobe = max(1, min(base_nprobe, nlist))
    target = SCAN_FACTOR * base_nprobe * rows / max(1, nlist)
    cumulative = np.cumsum(counts_in_order)
    by_rows = int(np.searchsorted(cumulative, min(target, float(cumulative[-1]))) + 1)
    with_rows = np.cumsum(counts_in_order > 0)
    by_lists = int(np.searchsorted(with_rows, min(LIST_FACTOR * base_nprobe, with_rows[-1])) + 1)
    nprobe = max(base_nprobe, min(max(by_rows, by_lists), nlist))
    return nprobe, int(sizes_in_order[:nprobe].sum())


def prefer_exact(allowed: int, scanned: int) -> bool:
    """Exact search over ``allowed`` rows costs no more than scanning ``scanned`` codes."""
    return allowed * EXACT_ROW_COST <= scanned


def batch_nprobe(
    per_list: np.ndarray, sizes: np.ndarray, orders: np.ndarray, base_nprobe: int, rows: int
) -> tuple[int, int]:
    """(nprobe, codes scanned) for a batch of queries: the largest ``ivf_nprobe`` over them.
    ``per_list`` and ``sizes`` are by list number, ``orders`` each query's lists nearest first."""
    chosen, scanned = 0, 0
    for order in orders:
        probe, codes = ivf_nprobe(per_list[order], sizes[order], base_nprobe, rows)
        chosen, scanned = max(chosen, probe), max(scanned, codes)
    return chosen, scanned
