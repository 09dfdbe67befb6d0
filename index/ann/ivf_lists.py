"""Where a version's rows sit in its IVF lists, and which rows each filter allows.

A filtered search (``ShardIndex.search_filtered``, planned by ``index.ann.filter_plan``) needs,
per query, how many allowed rows each IVF list holds, taken in the query's nearest-first list
order. Two things make that cheap, both kept per loaded version (it is immutable):

- ``IvfLists``: the list of every row key and the size of every list, read once from the
  inverted lists (on the first filtered search), and each query's list order from the coarse
  quantizer (through any pre-transform, as FAISS itself applies it);
- ``FilterMasks``: a filter's rows as a read-only mask, with their count and their count per
  list, in a small LRU (``FILTER_CACHE`` filters), so a filter repeated across queries is
  evaluated over the metadata columns once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import faiss
import numpy as np

from index.query.filters import Filter, evaluate
from index.rows.columns import Columns

FILTER_CACHE = 32  # filters whose masks a version keeps (an LRU: the version is immutable)


class IvfLists:
    """The IVF lists of one loaded version (``ivf`` is the IVF inside ``index``)."""

    def __init__(self, index: faiss.Index, ivf: faiss.IndexIVF, count: int) -> None:
        self._index = index
        self._ivf = ivf
        self._count = count
        self._lists: tuple[np.ndarray, np.ndarray] | None = None  # (list of each key, sizes)

    @property
    def nlist(self) -> int:
        return self._ivf.nlist

    def assignment(self) -> tuple[np.ndarray, np.ndarray]:
        """(IVF list of each row key, rows per list), read once from the inverted lists."""
        if self._lists is None:
            invlists = self._ivf.invlists
            list_of = np.zeros(self._count, np.int32)
            sizes = np.zeros(self._ivf.nlist, np.int64)
            for i in range(self._ivf.nlist):
                size = invlists.list_size(i)
                if size:
                    ids = invlists.get_ids(i)
                    try:
                        list_of[faiss.rev_swig_ptr(ids, size)] = i
                    finally:
                        invlists.release_ids(i, ids)
                sizes[i] = size
            self._lists = (list_of, sizes)
        return self._lists

    def per_list(self, keys: np.ndarray) -> np.ndarray:
        """How many of ``keys`` (row keys, or a mask over them) each list holds."""
        list_of, _ = self.assignment()
        return np.bincount(list_of[keys], minlength=self._ivf.nlist)

    def order(self, q: np.ndarray) -> np.ndarray:
        """Every IVF list, nearest first, for each query (the coarse quantizer's order)."""
        x = q
        index = self._index
        while isinstance(index, faiss.IndexPreTransform):
            for i in range(index.chain.size()):
                x = index.chain.at(i).apply(x)
            index = faiss.downcast_index(index.index)
        _, order = exact_quantizer(self._ivf).search(np.ascontiguousarray(x), self._ivf.nlist)
        return order


def graph_quantizer(ivf: faiss.IndexIVF) -> faiss.IndexHNSW | None:
    """The IVF's coarse quantizer when it is an HNSW graph over the centroids (large shards,
    ``index.ann.policy``), else None (an exact scan)."""
    quantizer = faiss.downcast_index(ivf.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def exact_quantizer(ivf: faiss.IndexIVF) -> faiss.Index:
    """The IVF's centroids as a flat index: its quantizer, or the storage under an HNSW quantizer,
    whose graph finds a query's nearest lists but need not rank all."""
    graph = graph_quantizer(ivf)
    return faiss.downcast_index(ivf.quantizer if graph is None else graph.storage)


@dataclass(frozen=True)
class Allowed:
    """A filter's rows in one version: the mask, how many, and how many in each IVF list."""

    mask: np.ndarray
    count: int
    per_list: np.ndarray | None  # None for a version without IVF lists

    def without(self, hidden: np.ndarray | None, lists: IvfLists | None) -> Allowed:
        """These rows less the row keys ``hidden`` (deleted or superseded); self if none is."""
        if hidden is None or not len(hidden):
            return self
        gone = hidden[self.mask[hidden]]
        if not len(gone):
            return self
        mask = self.mask.copy()
        mask[gone] = False
        per_list = self.per_list
        if per_list is not None and lists is not None:
            per_list = per_list - lists.per_list(gone)
        return Allowed(mask, self.count - len(gone), per_list)


class FilterMasks:
    """The rows each recent filter allows in one version (thread-safe; an LRU of
    ``FILTER_CACHE``)."""

    def __init__(self, columns: Columns, lists: IvfLists | None) -> None:
        self._columns = columns
        self._lists = lists
        self._masks: OrderedDict[Filter, Allowed] = OrderedDict()
        self._lock = threading.Lock()

    def allowed(self, flt: Filter) -> Allowed:
        with self._lock:
            found = self._masks.get(flt)
            if found is not None:
                self._masks.move_to_end(flt)
                return found
        mask = evaluate(flt, self._columns)
        mask.setflags(write=False)
        per_list = None if self._lists is None else self._lists.per_list(mask)
        found = Allowed(mask, int(np.count_nonzero(mask)), per_list)
        with self._lock:
            self._masks[flt] = found
            while len(self._masks) > FILTER_CACHE:
                self._masks.popitem(last=False)
        return found
