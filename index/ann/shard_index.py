"""One loaded, read-only version of one shard: approximate search, exact rerank, id lookups.

Search is two steps. The compressed index (IVF+PQ, or Flat for tiny shards) proposes
``candidates`` row keys per query; with ``rerank`` those are rescored exactly against the shard's
float16 vectors (memory-mapped, so only the candidates' pages are read) and the best ``k`` kept;
both steps are one FAISS call (``index.ann.refine``: the rows are its float16 codes, not copied).
Exact rescoring is what makes per-shard scores comparable, so ``index.query.merge.merge_topk`` over
shards gives the same answer as one big index whose candidates contain the same true neighbours.

Search parameters are passed per call (``faiss.SearchParametersIVF``), never set on the shared
index, so concurrent searches with different ``nprobe`` do not race.

A shard served live also has a *delta* (rows written after this version was built) and
tombstones: ``index.live.delta.LiveShard`` wraps a version with them; ``exclude`` here is how it
hides rows of this version inside the FAISS search.

``search_filtered`` evaluates a filter (``index.query.filters``) over the version's metadata
columns once per version and filter (``index.ann.ivf_lists.FilterMasks``: the version is
immutable), then searches the rows it allows by the plan of ``index.ann.filter_plan``: exact over
few rows, else IVF+PQ with an ``IDSelectorBitmap`` and an nprobe raised to where this query's
matching rows are.

Around this module: loading and checking a version (``index.ann.loading``), its rows and id
lookups (``index.ann.row_table``), its IVF list map and filter masks (``index.ann.ivf_lists``),
its RAM by part (``index.ann.memory``), and what a query batch must be (``index.ann.queries``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from index.ann.exact import exact_search
from index.ann.filter_plan import FilterPlan, batch_nprobe, prefer_exact
from index.ann.ivf_lists import FILTER_CACHE, FilterMasks, IvfLists
from index.ann.loading import LoadedVersion, fetch_version, open_version, resolve_version
from index.ann.memory import index_memory
from index.ann.policy import visit_nprobe
from index.ann.queries import check_k, check_queries
from index.ann.refine import RefinedSearch
from index.ann.rerank import best_k, exact_scores
from index.ann.row_table import RowTable
from index.ann.tune import find_ivf, saturated_nprobe
from index.query.filters import Filter
from index.query.hits import Hit
from index.rows.columns import Columns
from index.storage.store import Store
from index.storage.versions import IndexLoadError, check_version_dir, version_number

__all__ = [
    "FILTER_CACHE",
    "Hit",
    "IndexLoadError",
    "ShardIndex",
    "check_version_dir",
    "default_candidates",
    "index_memory",
    "resolve_version",
]

MAX_DEFAULT_CANDIDATES = 10_000


def default_candidates(k: int, tuned: int | None = None) -> int:
    """Per-shard candidates fetched from the compressed index for exact rerank.

    ``tuned`` is what the build measured for k=10 (meta.json ``candidates``); it scales with k.
    Without it: ``max(4k, 100)``.
    """
    if not tuned:
        return max(4 * k, 100)
    scaled = tuned * max(1, -(-k // 10))
    return max(4 * k, min(scaled, max(tuned, MAX_DEFAULT_CANDIDATES)))


class ShardIndex:
    """A shard's version, loaded; thread-safe for concurrent ``search`` calls."""

    def __init__(
        self,
        shard: int,
        name: str,
        meta: dict,
        index: faiss.Index,
        rows: RowTable,
        vectors: np.ndarray,
        directory: Path,
    ):
        self.shard = shard
        self.name = name  # the version directory, vNNNNNN-xxxxxxxx
        number = version_number(name)
        self.version = number if number is not None else int(meta.get("version") or 0)
        self.meta = meta
        self.count = int(meta["count"])
        self.dim = int(meta["dim"])
        self.metric = meta["metric"]
        self.directory = directory
        self.load_timings: dict = {}  # index.ann.loading.LoadedVersion.timings, when loaded
        self._index = index
        self._rows = rows
        self._vectors = vectors
        # the same memory map as a plain array: numpy's memmap adds ~15 us to every gather
        self._rows_f16 = vectors.view(np.ndarray) if isinstance(vectors, np.memmap) else vectors
        self._ivf = find_ivf(index)
        # candidates and their rerank in one FAISS call (index.ann.refine); None: numpy rerank
        self._refined = (
            None if self._ivf is None else RefinedSearch.over(index, self._rows_f16, self.metric)
        )
        self._saturated_nprobe = saturated_nprobe(meta) if self._ivf is not None else None
        self._lists = None if self._ivf is None else IvfLists(index, self._ivf, self.count)
        self._masks = FilterMasks(rows.columns(), self._lists)
        self._shared_params: dict[tuple, faiss.SearchParameters] = {}  # (nprobe, refined) -> shared
        self._visiting: dict[int, int] = {}  # visits -> nprobe (nprobe_visiting, per batch)
        self._memory_bytes: int | None = None

    def __repr__(self) -> str:
        return (
            f"ShardIndex(shard={self.shard}, version={self.name!r}, count={self.count}, "
            f"factory={self.meta['factory']!r})"
        )

    # ---- loading (index.ann.loading) ----------------------------------------------------------
    @classmethod
    def load(
        cls,
        store: Store,
        shard: int,
        version: str | int | None = None,
        *,
        verify: bool = True,
    ) -> ShardIndex:
        """Load a version of ``shard``: its directory name (``vNNNNNN-xxxxxxxx``), its number,
        or None for the live one the manifest names.

        ``verify`` checks every file's size and SHA-256 against ``meta.json`` (a corrupt or
        truncated file raises IndexLoadError); ``verify=False`` checks sizes only. On an object
        store the directory is copied into the node cache first (``index.storage.cache``); a
        cached copy that fails the check is dropped and fetched once more.
        """
        name = resolve_version(store, shard, version)
        return cls._of(fetch_version(store, shard, name, verify=verify), shard, name)

    @classmethod
    def open_dir(
        cls,
        directory: str | Path,
        *,
        shard: int = -1,
        version: str | None = None,
        verify: bool = True,
    ) -> ShardIndex:
        """Load a version directory on the local filesystem (what ``load`` does after fetching)."""
        return cls._of(open_version(directory, verify=verify), shard, version)

    @classmethod
    def _of(cls, loaded: LoadedVersion, shard: int, version: str | None) -> ShardIndex:
        meta = loaded.meta
        out = cls(
            meta.get("shard", shard) if shard < 0 else shard,
            version or meta.get("dir") or loaded.directory.name,
            meta,
            loaded.index,
            loaded.rows,
            loaded.vectors,
            loaded.directory,
        )
        out.load_timings = dict(loaded.timings)
        return out

    # ---- search -------------------------------------------------------------------------------
    @property
    def default_nprobe(self) -> int:
        return int(self.meta.get("nprobe") or 1)

    def nprobe_visiting(self, visits: int) -> int:
        """The default nprobe when each query visits ``visits`` shards of a hash store at once:
        the tuning's floor shared among them (``index.ann.policy.visit_nprobe``). Fixed for a
        version and a shard count, so worked out once: every batch asks, for every shard."""
        nprobe = self._visiting.get(visits)
        if nprobe is None:
            nprobe = visit_nprobe(
                self.default_nprobe, self._saturated_nprobe, self.nlist, self.count, visits
            )
            self._visiting[visits] = nprobe
        return nprobe

    @property
    def nlist(self) -> int:
        return self._ivf.nlist if self._ivf is not None else 0

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        candidates: int | None = None,
        rerank: bool = True,
        exclude: faiss.IDSelector | None = None,
        fields: Sequence[str] | None = None,
    ) -> list[list[Hit]]:
        """Top ``k`` hits of each query (one list per query, best first, up to ``k`` long).

        ``nprobe`` (default: the version's ``meta.nprobe``) is the number of IVF lists visited;
        ``candidates`` (default: the number the build measured for recall, see ``index.ann.tune``,
        scaled with k; ``max(4k, 100)`` for older versions) how many compressed-index results are
        rescored exactly when ``rerank``. Without rerank, scores are the index's approximations.
        ``exclude`` selects row keys to hide (deleted or superseded rows, ``index.live.delta``);
        it is applied inside the FAISS search, so up to ``k`` visible rows still come back.
        ``fields`` names the metadata columns each hit carries (``Hit.metadata``; None: none).
        """
        q = check_queries(queries, self.dim)
        check_k(k)
        if self.count == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        fetch = self.fetch_size(k, candidates, rerank)
        scores, keys = self._scored(q, fetch, nprobe, exclude, rerank)
        # a Flat index's scores are already exact: nothing to rerank
        return self._best(scores, keys, k, rerank and self._ivf is not None, fields)

    def scored_candidates(
        self,
        q: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        candidates: int | None = None,
        rerank: bool = True,
        exclude: faiss.IDSelector | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every candidate of a top-``k`` search, scored, not ranked nor read: ``(scores, keys)``
        of shape ``(len(q), fetch_size(k, candidates, rerank))``, -1 keys padding short lists.
        With ``rerank`` the scores are exact (``index.ann.rerank.exact_scores``), so candidates
        of many shards can be ranked together once (``index.live.group_search``). ``q`` is
        checked already (``index.ann.queries.check_queries``); the options are ``search``'s."""
        if self.count == 0 or len(q) == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        return self._scored(q, self.fetch_size(k, candidates, rerank), nprobe, exclude, rerank)

    def hits_at(
        self, keys: np.ndarray, scores: Sequence[float], fields: Sequence[str] | None = None
    ) -> list[Hit]:
        """The hits of row ``keys`` (valid ones) with their ``scores``: only an answer's rows
        are read from the row table (``RowTable.ids_uris``)."""
        ids, uris = self._rows.ids_uris(keys)
        metas = self.metadata_of(keys, fields) if fields else [None] * len(ids)
        return [
            Hit(i, u, float(s), self.shard, m)
            for i, u, s, m in zip(ids, uris, scores, metas, strict=True)
        ]

    # ---- filtered search ----------------------------------------------------------------------
    def filter_mask(self, flt: Filter) -> np.ndarray:
        """Which rows of this version match ``flt`` (read-only; cached per filter)."""
        return self._masks.allowed(flt).mask

    def search_filtered(
        self,
        queries: np.ndarray,
        k: int,
        flt: Filter,
        *,
        hidden: np.ndarray | None = None,
        nprobe: int | None = None,
        candidates: int | None = None,
        rerank: bool = True,
        fields: Sequence[str] | None = None,
    ) -> tuple[list[list[Hit]], FilterPlan]:
        """Top ``k`` hits among the rows ``flt`` allows, less the row keys ``hidden`` (deleted
        or superseded, ``index.live.delta``), and the plan it followed (``index.ann.filter_plan``):
        exact search over the allowed rows when they are few, else IVF+PQ with a bitmap
        selector and an nprobe raised to where this query's allowed rows are."""
        q = check_queries(queries, self.dim)
        check_k(k)
        allowed = self._masks.allowed(flt).without(hidden, self._lists)
        mask, count = allowed.mask, allowed.count
        if count == 0 or len(q) == 0:
            return [[] for _ in range(len(q))], FilterPlan("none", 0, self.count)
        if self._lists is None:
            return self._search_rows(q, k, mask, count, fields), FilterPlan(
                "exact", count, self.count
            )
        base_nprobe = self.default_nprobe if nprobe is None else int(nprobe)
        if base_nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {base_nprobe}")
        _, sizes = self._lists.assignment()
        chosen, scanned = batch_nprobe(
            allowed.per_list, sizes, self._lists.order(q), base_nprobe, self.count
        )
        if prefer_exact(count, scanned):
            hits = self._search_rows(q, k, mask, count, fields)
            return hits, FilterPlan("exact", count, self.count)
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(self.count, faiss.swig_ptr(bitmap))
        fetch = self.fetch_size(k, candidates, rerank)
        scores, keys = self._scored(q, fetch, chosen, selector, rerank)
        del selector, bitmap  # the search is done with them (they lived until here)
        plan = FilterPlan("ivf", count, self.count, chosen, scanned)
        return self._best(scores, keys, k, rerank, fields), plan

    def _search_rows(
        self, q: np.ndarray, k: int, mask: np.ndarray, count: int, fields
    ) -> list[list[Hit]]:
        """Exact top ``k`` over the rows of ``mask`` (``count`` of them), by row key."""
        rows = np.flatnonzero(mask)
        scores, found = exact_search(q, self._vectors[rows], min(k, count), self.metric)
        keys = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
        return self._hits(scores, keys, fields)

    # ---- the compressed index and rerank ------------------------------------------------------
    def fetch_size(self, k: int, candidates: int | None = None, rerank: bool = True) -> int:
        """How many results a search of top ``k`` takes from the compressed index."""
        if rerank and self._ivf is not None:
            fetch = max(k, candidates or default_candidates(k, self.meta.get("candidates")))
        else:
            fetch = k
        return min(fetch, self.count)

    def _scored(
        self,
        q: np.ndarray,
        n: int,
        nprobe: int | None,
        exclude: faiss.IDSelector | None,
        rerank: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row keys) of ``n`` candidates per query from the compressed index, -1 keys
        padding short lists; with ``rerank`` the scores are exact (float16 rows): rescored in
        the same FAISS call (``index.ann.refine``), or in numpy (``index.ann.rerank``) where
        the rows do not allow it. A Flat index's scores are exact already."""
        if not rerank or self._ivf is None:
            return self._index.search(q, n, params=self._params(nprobe, exclude))
        if self._refined is None:
            scores, keys = self._index.search(q, n, params=self._params(nprobe, exclude))
            return exact_scores(self._rows_f16, self.metric, q, keys), keys
        return self._refined.search(q, n, self._params(nprobe, exclude, refined=True))

    def _params(
        self, nprobe: int | None, exclude: faiss.IDSelector | None = None, refined: bool = False
    ) -> faiss.SearchParameters | None:
        """A search's parameters (``refined``: for ``self._refined``, the base's inside); without
        ``exclude`` made once per nprobe and shared (FAISS only reads them: ~20 us a search
        saved, per shard of a group)."""
        if exclude is None and self._ivf is not None:
            cached = self._shared_params.get((nprobe, refined))
            if cached is None:
                cached = self._make_params(nprobe, None, refined)
                if len(self._shared_params) < 16:  # a few nprobes are ever asked for
                    self._shared_params[(nprobe, refined)] = cached
            return cached
        return self._make_params(nprobe, exclude, refined)

    def _make_params(
        self, nprobe: int | None, exclude: faiss.IDSelector | None, refined: bool = False
    ) -> faiss.SearchParameters | None:
        if self._ivf is None:
            return None if exclude is None else faiss.SearchParameters(sel=exclude)
        nprobe = self.default_nprobe if nprobe is None else int(nprobe)
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self._ivf.nlist))
        if exclude is not None:
            params.sel = exclude
        if isinstance(self._index, faiss.IndexPreTransform):
            wrapper = faiss.SearchParametersPreTransform(index_params=params)
            wrapper.referenced = params  # keep the inner object alive as long as the wrapper
            params = wrapper
        return RefinedSearch.params(params) if refined else params

    def _best(
        self,
        scores: np.ndarray,
        keys: np.ndarray,
        k: int,
        rerank: bool,
        fields: Sequence[str] | None,
    ) -> list[list[Hit]]:
        """The hits of the best ``k`` candidates (``_scored``'s): by exact score, ties by row
        key (= id order, ``index.ann.rerank.best_k``), or as the index ranked them."""
        if rerank:
            scores, keys = best_k(scores, keys, self.metric, k)
        else:
            scores, keys = scores[:, :k], keys[:, :k]
        return self._hits(scores, keys, fields)

    def search_exact(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Brute-force top ``k`` over every stored (float16) vector (``index.ann.exact``): the
        reference the recall tool measures the index against."""
        q = check_queries(queries, self.dim)
        check_k(k)
        if self.count == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        scores, keys = exact_search(q, self._vectors, min(k, self.count), self.metric)
        return self._hits(scores, keys)

    def _hits(
        self, scores: np.ndarray, keys: np.ndarray, fields: Sequence[str] | None = None
    ) -> list[list[Hit]]:
        """Per query, the hits of its valid keys (``hits_at`` once for the whole batch)."""
        valid = keys >= 0
        flat = self.hits_at(keys[valid], scores[valid].tolist(), fields)
        out: list[list[Hit]] = []
        pos = 0
        for count in valid.sum(axis=1).tolist():
            out.append(flat[pos : pos + count])
            pos += count
        return out

    # ---- lookups (index.ann.row_table) --------------------------------------------------------
    @property
    def metadata_schema(self) -> dict[str, str]:
        """``{column: type}`` of the metadata this version holds."""
        return {} if self._rows.meta is None else self._rows.meta.schema

    @property
    def metadata(self) -> Columns:
        """Every row's metadata columns, by row key (``index.rows.columns``)."""
        return self._rows.columns()

    def metadata_of(self, keys: np.ndarray, fields: Sequence[str] | None = None) -> list[dict]:
        """The metadata of row ``keys`` (``fields``, default every column this version has;
        a column it lacks, added to the store later, reads as None)."""
        meta = self._rows.columns()
        names = list(meta.columns) if fields is None else list(fields)
        return meta.records(np.asarray(keys, np.int64), names)

    def row_key(self, row_id: str) -> int | None:
        """Row key of an id, or None (binary search over the rows in id order)."""
        return self._rows.key_of(row_id)

    def row_keys(self, row_ids: list[str]) -> np.ndarray:
        """Row keys of many ids at once (-1 where absent): one hash join, for bulk lookups."""
        return self._rows.keys_of(row_ids)

    def ingested_at(self, key: int) -> int:
        """``ingested_at`` (ms) of a row key: what the visibility rules compare."""
        return int(self._rows.ingested[key])

    def id_of(self, key: int) -> str:
        return self._rows.ids[key].as_py()

    def uri_of(self, key: int) -> str:
        return self._rows.uris[key].as_py()

    def vector_of(self, row_id: str) -> np.ndarray | None:
        """The stored vector of ``row_id`` as float32 (from float16), or None if not here."""
        key = self.row_key(row_id)
        return None if key is None else np.asarray(self._vectors[key], dtype=np.float32)

    # ---- accounting (index.ann.memory) --------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes this version holds in RAM: the index (codes, ids, centroids, tables) and the
        row ids/uris/metadata. The memory-mapped float16 vectors are not counted (page cache).
        Counted once: a version never changes, and the count walks every inverted list."""
        if self._memory_bytes is None:
            self._memory_bytes = index_memory(self._index)["total"] + self._rows.nbytes
        return self._memory_bytes

    def memory_breakdown(self) -> dict:
        """``index_memory`` of the FAISS index plus the row table and mapped vectors sizes."""
        return {
            **index_memory(self._index),
            "rows": self._rows.nbytes,
            "metadata": 0 if self._rows.meta is None else self._rows.meta.nbytes,
            "vectors_mmap": int(self._vectors.nbytes),
        }
