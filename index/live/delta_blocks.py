"""Frozen blocks of a live shard's delta: its older rows searched through an index, not scanned.

Why: a delta is searched exactly (``index.ann.exact``), every live row on every query; at 100k
rows x 1280-d that is 512 MB of float32 read per query, and the rebuild that folds the delta into
the base comes only every ``rebuild_delta_*`` rows or bytes and takes minutes. So once the rows
past the last block reach ``block_rows_for(dim)`` (``BLOCK_BYTES`` of float32; per ``LiveShard``
for tests), they are
*frozen*: rows ``[frozen, n)`` of the delta become one immutable ``DeltaBlock`` with an HNSW index
of its own, and a search reads each block's index plus the rows after the last block (the
*tail*) exactly.

The index is ``IndexHNSWSQ`` with float16 storage (``HNSW_M`` links, ``EF_CONSTRUCTION``): delta
rows are already rounded through float16 (``index.live.delta``), so that storage holds them
losslessly in 40 % less memory than ``IndexHNSWFlat`` (15.7 against 25.9 MB for 20k x 256), whose
float32 copy would double the delta's RAM. Measured (one thread, 100k x 256 Gaussian-mixture rows
in five blocks, k=10): 2.9 ms per single query against 17.4 ms for the exact scan, recall@10 1.0
against it for held-out queries; each 20k-row block built in about 4 s. IVF-Flat (128 lists,
nprobe 16) scans 12.5 % of a block per query and kept recall 0.5-0.6 under 10 % selectors.

Every candidate a block returns is rescored from the delta's float32 rows with the rerank's
arithmetic (``index.ann.rerank``), as are the tail's, so block and tail hits merge on like scores
(inner product higher, squared L2 lower, ties to the lower row), as ``exact_search`` orders them.

Deleted, superseded and filtered-out rows stay in a block's graph (it is never mutated) and are
masked per search with an ``IDSelectorBitmap`` in ``SearchParametersHNSW``; ``efSearch`` grows by
the fraction masked out. HNSW loses recall when a selector rejects most of the graph (on 20k rows,
0.96-0.97 with 20-30 % kept by a category filter, even at that ``efSearch``), so a block with fewer
than ``MIN_FRACTION`` of its rows allowed is scanned exactly over those rows instead: at most half a
block's scan, and exact.

Building runs on a thread of the ``Freezer`` (one build at a time per view), never under the
view's lock: the rows ``[frozen, n)`` of a published buffer never change (appends write past
``n`` or into a new buffer), so the build reads them unlocked; the finished index is published
under the lock in the next snapshot, after which nothing writes to it. A search reads the blocks
its snapshot holds and never waits for a build. ``adopt`` lets a rebased view keep the old view's
blocks (their indexes are shared; each view maps a block's labels to its own rows).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from index.ann.build import faiss_metric
from index.ann.exact import exact_search
from index.ann.rerank import best_k, exact_scores

__all__ = ["BLOCK_BYTES", "DeltaBlock", "block_rows_for", "Freezer", "build_block", "search_frozen"]

log = logging.getLogger(__name__)

# tail rows that make a block: 16 MiB of float32 vectors (16,384 rows at 256-d, 3,276 at 1280-d),
# so a delta under the Rebuilder's byte budget (rebuild_delta_bytes) is in blocks at any dim
BLOCK_BYTES = 16 << 20
MIN_BLOCK_ROWS = 2048


def block_rows_for(dim: int) -> int:
    """Tail rows frozen into one block at ``dim``: ``BLOCK_BYTES`` of float32 vectors."""
    return max(MIN_BLOCK_ROWS, BLOCK_BYTES // (4 * max(1, int(dim))))


HNSW_M = 32
EF_CONSTRUCTION = 40
EF_SEARCH = 64
MIN_FRACTION = 0.5  # below: the block's allowed rows are scanned exactly


@dataclass(frozen=True)
class DeltaBlock:
    """One frozen run of delta rows: ``index`` labels ``0..len(rows)-1`` are the rows ``rows``
    of the view that holds it (-1: a row that view does not hold, after a rebase dropped it)."""

    index: faiss.Index  # complete before publication and never mutated after
    rows: np.ndarray  # int64, label -> delta row
    start: int = -1  # rows is range(start, start + len(rows)) when >= 0: masks are views

    @classmethod
    def of(cls, index: faiss.Index, rows: np.ndarray) -> DeltaBlock:
        """The block, with ``start`` set when its rows are consecutive (every built block, and an
        adopted one a rebase dropped no row of)."""
        first = int(rows[0]) if len(rows) else -1
        consecutive = first >= 0 and np.array_equal(rows, np.arange(first, first + len(rows)))
        return cls(index, rows, first if consecutive else -1)

    @property
    def nbytes(self) -> int:
        """Its RAM: float16 vectors, about 2 * M level-0 links of 4 bytes per row, the map."""
        return len(self.rows) * (2 * self.index.d + 8 * HNSW_M + 8)


def build_block(vectors: np.ndarray, metric: str) -> faiss.Index:
    """An HNSW index over ``vectors`` (float32 rows, already float16-exact); slow, unlocked."""
    index = faiss.IndexHNSWSQ(
        vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, HNSW_M, faiss_metric(metric)
    )
    index.hnsw.efConstruction = EF_CONSTRUCTION
    x = np.ascontiguousarray(vectors, np.float32)
    index.train(x)  # fp16 needs no statistics; FAISS still asks for the call
    index.add(x)
    return index


class Freezer:
    """Which rows of one view's delta are frozen (``blocks`` cover rows ``[0, frozen)``) and the
    build in flight. Its fields change only under ``lock`` (the view's), where ``publish`` (the
    view's, which calls ``due``) makes them visible to searches."""

    def __init__(self, metric: str, lock, publish: Callable[[], None], block_rows: int) -> None:
        self.metric = metric
        self.block_rows = int(block_rows)  # 0: never freeze
        self.blocks: tuple[DeltaBlock, ...] = ()
        self.frozen = 0
        self.error: str | None = None  # why the last build failed (no more builds then)
        self._lock = lock
        self._publish = publish
        self._building = False

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def due(self, buf: np.ndarray, n: int) -> None:
        """Start building a block of rows ``[frozen, n)`` of ``buf`` when they are enough and no
        build runs (caller holds the lock). Returns at once: the thread builds unlocked."""
        if self._building or self.error or not self.block_rows or n - self.frozen < self.block_rows:
            return
        self._building = True
        start, vectors = self.frozen, buf[self.frozen : n]  # final rows: nothing rewrites them
        name = f"delta-block-{start}-{n}"
        threading.Thread(target=self._build, args=(vectors, start), name=name, daemon=True).start()

    def _build(self, vectors: np.ndarray, start: int) -> None:
        try:
            index = build_block(vectors, self.metric)
        except Exception as e:  # any failure: the rows stay in the exactly searched tail
            log.exception("delta block of %d rows failed; the delta stays exact", len(vectors))
            with self._lock:
                self._building, self.error = False, f"{type(e).__name__}: {e}"
            return
        block = DeltaBlock.of(index, np.arange(start, start + len(vectors), dtype=np.int64))
        with self._lock:
            self.blocks += (block,)
            self.frozen = start + len(vectors)
            self._building = False
            self._publish()  # the next snapshot searches the block; may start the next one

    def adopt(
        self,
        blocks: tuple[DeltaBlock, ...],
        old_parts: dict[str, tuple[int, int]],
        new_parts: dict[str, tuple[int, int]],
    ) -> None:
        """Keep an old view's ``blocks`` in this view, whose delta was empty before the old view's
        uncovered parts were copied in, in order (``LiveShard.carry_into``; caller holds the
        lock). Rows of parts the new base covers map to -1 (masked); a block left with none is
        dropped. The old blocks cover the old delta's first rows, so their carried rows are this
        view's first rows: checked, and nothing is adopted if not."""
        if not blocks or self.blocks or self._building:  # this view froze rows of its own
            return
        old_to_new = np.full(max(b for _, b in old_parts.values()), -1, np.int64)
        for part, (a, b) in old_parts.items():
            if part in new_parts:
                na, nb = new_parts[part]
                old_to_new[a:b] = np.arange(na, nb)  # the same part: as many rows
        kept = []
        for block in blocks:
            rows = np.where(block.rows >= 0, old_to_new[np.maximum(block.rows, 0)], -1)
            if (rows >= 0).any():
                kept.append(DeltaBlock.of(block.index, rows))
        owned = np.concatenate([b.rows[b.rows >= 0] for b in kept]) if kept else np.zeros(0)
        if not np.array_equal(np.sort(owned), np.arange(len(owned))):
            return  # not this view's first rows: its own builds will freeze them again
        self.blocks, self.frozen = tuple(kept), len(owned)


def search_frozen(
    blocks: tuple[DeltaBlock, ...],
    frozen: int,
    vectors: np.ndarray,
    q: np.ndarray,
    k: int,
    metric: str,
    valid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)`` of the ``k`` best rows ``valid`` allows, as ``exact_search`` returns
    them (best first, -1 rows and NaN scores past the end): each block's index, then the tail
    ``[frozen, len(valid))`` exactly, rescored together (``index.ann.rerank``)."""
    found = [_search_block(b, vectors, q, k, metric, valid) for b in blocks]
    if len(valid) > frozen and valid[frozen:].any():
        _, tail = exact_search(q, vectors[frozen : len(valid)], k, metric, valid=valid[frozen:])
        found.append(np.where(tail >= 0, tail + frozen, -1))
    if not found:
        return np.full((len(q), k), np.nan, np.float32), np.full((len(q), k), -1, np.int64)
    keys = np.concatenate(found, axis=1)
    scores, rows = best_k(exact_scores(vectors, metric, q, keys), keys, metric, k)
    scores = np.where(rows >= 0, scores, np.nan).astype(np.float32)
    if rows.shape[1] < k:  # fewer candidates than k: pad as exact_search does
        pad = k - rows.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return scores, rows


def _search_block(
    block: DeltaBlock, vectors: np.ndarray, q: np.ndarray, k: int, metric: str, valid: np.ndarray
) -> np.ndarray:
    """(nq, <=k) candidate delta rows of one block (-1: none): its index with the rows ``valid``
    does not allow masked, or an exact scan of the allowed rows when they are few."""
    if block.start >= 0:  # per query this is the cost besides the graph: a view, no gather
        allowed = valid[block.start : block.start + len(block.rows)]
    else:
        owned = block.rows >= 0
        allowed = owned.copy()
        allowed[owned] = valid[block.rows[owned]]
    count = int(np.count_nonzero(allowed))
    if count == 0:
        return np.full((len(q), 0), -1, np.int64)
    if count < MIN_FRACTION * len(allowed) or count <= k:
        rows = block.rows[allowed]
        _, found = exact_search(q, vectors[rows], min(k, count), metric)
        return np.where(found >= 0, rows[np.maximum(found, 0)], -1)
    fraction = count / len(allowed)
    params = faiss.SearchParametersHNSW(efSearch=math.ceil(max(EF_SEARCH, k) / fraction))
    bitmap = selector = None
    if count < len(allowed):  # params.sel holds a raw pointer: both must outlive the search
        bitmap = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        params.sel = selector
    _, labels = block.index.search(q, min(k, count), params=params)
    del params, selector, bitmap  # the search is done with them (they lived until here)
    return np.where(labels >= 0, block.rows[np.maximum(labels, 0)], -1)
