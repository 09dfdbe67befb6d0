"""One loaded, read-only version of one shard: approximate search, exact rerank, id lookups.

Search is two steps. The compressed index (IVF+PQ, or Flat for tiny shards) proposes
``candidates`` row keys per query; with ``rerank`` those are rescored exactly against the shard's
float16 vectors (memory-mapped, so only the candidates' pages are read) and the best ``k`` kept.
Exact rescoring is what makes per-shard scores comparable, so ``index.query.merge.merge_topk`` over
shards gives the same answer as one big index whose candidates contain the same true neighbours.

Search parameters are passed per call (``faiss.SearchParametersIVF``), never set on the shared
index, so concurrent searches with different ``nprobe`` do not race.

A shard served live also has a *delta* (rows written after this version was built) and
tombstones: ``index.live.delta.LiveShard`` wraps a version with them; ``exclude`` here is how it
hides
rows of this version inside the FAISS search.

Row ids are kept as one Arrow string array (offsets + bytes: the size of the ids themselves, so
one long id costs only its own bytes) with each row's ``ingested_at`` (for the visibility rules),
and looked up by binary search over the rows, which builds store sorted by id.

Metadata columns of ``rows.parquet`` are held in memory in the compact columnar form of
``index.rows.columns``. ``search_filtered`` evaluates a filter (``index.query.filters``) over them
once
per version and filter (a small LRU cache: the version is immutable), then searches the rows it
allows by the plan of ``index.ann.filter_plan``: exact over few rows, else IVF+PQ with an
``IDSelectorBitmap`` and an nprobe raised to where this query's matching rows are.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index.ann.exact import exact_search
from index.ann.filter_plan import FilterPlan, ivf_nprobe, prefer_exact
from index.ann.rerank import rerank
from index.ann.tune import find_ivf
from index.query.filters import Filter, evaluate
from index.query.hits import Hit
from index.rows import schema
from index.rows.columns import Columns
from index.rows.metadata import MetadataError, metadata_columns
from index.rows.visibility import ms_of
from index.storage.manifest import load_manifest
from index.storage.publish import list_versions
from index.storage.store import Store
from index.storage.versions import (
    INDEX_FILE,
    KEY,
    ROWS_FILE,
    VECTORS_FILE,
    IndexLoadError,
    check_files,
    check_version_dir,
    read_meta,
    version_number,
)

__all__ = ["Hit", "IndexLoadError", "ShardIndex", "check_version_dir", "index_memory"]

MAX_DEFAULT_CANDIDATES = 10_000
FILTER_CACHE = 32  # filters whose masks a version keeps (an LRU: the version is immutable)


def default_candidates(k: int, tuned: int | None = None) -> int:
    """Per-shard candidates fetched from the compressed index for exact rerank.

    ``tuned`` is what the build measured for k=10 (meta.json ``candidates``); it scales with k.
    Without it: ``max(4k, 100)``.
    """
    if not tuned:
        return max(4 * k, 100)
    scaled = tuned * max(1, -(-k // 10))
    return max(4 * k, min(scaled, max(tuned, MAX_DEFAULT_CANDIDATES)))


@dataclass
class _Rows:
    ids: pa.Array  # string array by row key; sorted when built by index.live.rebuild
    uris: pa.Array
    ingested: np.ndarray  # int64 ms by row key (0 when unknown)
    order: np.ndarray | None = None  # row keys in id order, when the ids are not sorted
    meta: Columns | None = None  # metadata columns by row key (index.rows.columns)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.order is None else self.order.nbytes
        extra += 0 if self.meta is None else self.meta.nbytes
        return self.ids.nbytes + self.uris.nbytes + self.ingested.nbytes + extra


@dataclass(frozen=True)
class _Allowed:
    """A filter's rows in one version: the mask, how many, and how many in each IVF list."""

    mask: np.ndarray
    count: int
    per_list: np.ndarray | None  # None for a version without IVF lists


class ShardIndex:
    """A shard's version, loaded; thread-safe for concurrent ``search`` calls."""

    def __init__(
        self,
        shard: int,
        name: str,
        meta: dict,
        index: faiss.Index,
        rows: _Rows,
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
        self._index = index
        self._rows = rows
        self._vectors = vectors
        self._ivf = find_ivf(index)
        self._lists: tuple[np.ndarray, np.ndarray] | None = None  # (list of each key, sizes)
        self._masks: OrderedDict[Filter, _Allowed] = OrderedDict()
        self._masks_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"ShardIndex(shard={self.shard}, version={self.name!r}, count={self.count}, "
            f"factory={self.meta['factory']!r})"
        )

    # ---- loading ------------------------------------------------------------------------------
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
        store the directory is copied into the node cache first (``index.storage.cache``); a cached
        copy
        that fails the check is dropped and fetched once more.
        """
        name = resolve_version(store, shard, version)
        remote = store.index_version_dir(shard, name)
        if not store.exists(remote):
            raise IndexLoadError(f"index version {remote} does not exist")
        for attempt in (1, 2):
            try:
                directory = store.local_dir(remote)
            except (OSError, FileNotFoundError) as e:
                raise IndexLoadError(f"could not fetch {remote}: {e}") from e
            try:
                return cls.open_dir(directory, shard=shard, version=name, verify=verify)
            except IndexLoadError:
                if store.is_local or attempt == 2:
                    raise
                store.evict_local(remote)  # a bad copy in the cache: fetch it again
        raise AssertionError("unreachable")

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
        directory = Path(directory)
        meta = read_meta(directory)
        check_files(directory, meta, verify)
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as e:
            raise IndexLoadError(f"{directory / INDEX_FILE}: unreadable FAISS index: {e}") from e
        count, dim = int(meta["count"]), int(meta["dim"])
        if index.ntotal != count or index.d != dim:
            raise IndexLoadError(
                f"{directory}: index holds {index.ntotal} x {index.d}-d, meta says {count} x {dim}"
            )
        try:
            vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise IndexLoadError(f"{directory / VECTORS_FILE}: {e}") from e
        if vectors.shape != (count, dim) or vectors.dtype != np.float16:
            raise IndexLoadError(f"{directory / VECTORS_FILE}: {vectors.shape} {vectors.dtype}")
        rows = _read_rows(directory / ROWS_FILE, count)
        name = version or meta.get("dir") or directory.name
        return cls(
            meta.get("shard", shard) if shard < 0 else shard,
            name,
            meta,
            index,
            rows,
            vectors,
            directory,
        )

    # ---- search -------------------------------------------------------------------------------
    @property
    def default_nprobe(self) -> int:
        return int(self.meta.get("nprobe") or 1)

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
        ``exclude`` selects row keys to hide (deleted or superseded rows, ``index.live.delta``); it
        is
        applied inside the FAISS search, so up to ``k`` visible rows still come back. ``fields``
        names the metadata columns each hit carries (``Hit.metadata``; None: none).
        """
        q = self._check_queries(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.count == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        exact_index = self._ivf is None  # Flat: the index's scores are already exact
        fetch = self.fetch_size(k, candidates, rerank)
        scores, keys = self._candidates(q, fetch, nprobe, exclude)
        if rerank and not exact_index:
            scores, keys = self.rerank(q, keys, k)
        else:
            scores, keys = scores[:, :k], keys[:, :k]
        return self._hits(scores, keys, fields)

    # ---- filtered search ----------------------------------------------------------------------
    def filter_mask(self, flt: Filter) -> np.ndarray:
        """Which rows of this version match ``flt`` (read-only; cached per filter)."""
        return self._allowed(flt).mask

    def _allowed(self, flt: Filter) -> _Allowed:
        with self._masks_lock:
            found = self._masks.get(flt)
            if found is not None:
                self._masks.move_to_end(flt)
                return found
        mask = evaluate(flt, self._rows.meta or Columns(self.count))
        mask.setflags(write=False)
        per_list = None
        if self._ivf is not None:
            list_of, _ = self._list_assignment()
            per_list = np.bincount(list_of[mask], minlength=self._ivf.nlist)
        found = _Allowed(mask, int(np.count_nonzero(mask)), per_list)
        with self._masks_lock:
            self._masks[flt] = found
            while len(self._masks) > FILTER_CACHE:
                self._masks.popitem(last=False)
        return found

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
        q = self._check_queries(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        found = self._allowed(flt)
        mask, count, per_list = found.mask, found.count, found.per_list
        if hidden is not None and len(hidden):
            gone = hidden[mask[hidden]]
            if len(gone):
                mask = mask.copy()
                mask[gone] = False
                count -= len(gone)
                if per_list is not None:
                    list_of, _ = self._list_assignment()
                    per_list = per_list - np.bincount(list_of[gone], minlength=len(per_list))
        if count == 0 or len(q) == 0:
            return [[] for _ in range(len(q))], FilterPlan("none", 0, self.count)
        if self._ivf is None:
            return self._search_rows(q, k, mask, count, fields), FilterPlan(
                "exact", count, self.count
            )
        base_nprobe = self.default_nprobe if nprobe is None else int(nprobe)
        if base_nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {base_nprobe}")
        _, sizes = self._list_assignment()
        order = self._list_order(q)
        chosen, scanned = 0, 0
        for row in order:
            probe, codes = ivf_nprobe(per_list[row], sizes[row], base_nprobe, self.count)
            chosen, scanned = max(chosen, probe), max(scanned, codes)
        if prefer_exact(count, scanned):
            hits = self._search_rows(q, k, mask, count, fields)
            return hits, FilterPlan("exact", count, self.count)
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(self.count, faiss.swig_ptr(bitmap))
        fetch = self.fetch_size(k, candidates, rerank)
        scores, keys = self._candidates(q, fetch, chosen, selector)
        del selector, bitmap  # the search is done with them (they lived until here)
        if rerank:
            scores, keys = self.rerank(q, keys, k)
        else:
            scores, keys = scores[:, :k], keys[:, :k]
        plan = FilterPlan("ivf", count, self.count, chosen, scanned)
        return self._hits(scores, keys, fields), plan

    def _search_rows(
        self, q: np.ndarray, k: int, mask: np.ndarray, count: int, fields
    ) -> list[list[Hit]]:
        """Exact top ``k`` over the rows of ``mask`` (``count`` of them), by row key."""
        rows = np.flatnonzero(mask)
        scores, found = exact_search(q, self._vectors[rows], min(k, count), self.metric)
        keys = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
        return self._hits(scores, keys, fields)

    def _list_assignment(self) -> tuple[np.ndarray, np.ndarray]:
        """(IVF list of each row key, rows per list), read once from the inverted lists."""
        if self._lists is None:
            invlists = self._ivf.invlists
            list_of = np.zeros(self.count, np.int32)
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

    def _list_order(self, q: np.ndarray) -> np.ndarray:
        """Every IVF list, nearest first, for each query (the coarse quantizer's order)."""
        x = q
        index = self._index
        while isinstance(index, faiss.IndexPreTransform):
            for i in range(index.chain.size()):
                x = index.chain.at(i).apply(x)
            index = faiss.downcast_index(index.index)
        _, order = self._ivf.quantizer.search(np.ascontiguousarray(x), self._ivf.nlist)
        return order

    def fetch_size(self, k: int, candidates: int | None = None, rerank: bool = True) -> int:
        """How many results a search of top ``k`` takes from the compressed index."""
        if rerank and self._ivf is not None:
            fetch = max(k, candidates or default_candidates(k, self.meta.get("candidates")))
        else:
            fetch = k
        return min(fetch, self.count)

    def _candidates(
        self,
        q: np.ndarray,
        n: int,
        nprobe: int | None,
        exclude: faiss.IDSelector | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate (scores, row keys) from the compressed index; -1 keys pad short lists."""
        return self._index.search(q, n, params=self._params(nprobe, exclude))

    def _params(
        self, nprobe: int | None, exclude: faiss.IDSelector | None = None
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
            return wrapper
        return params

    def rerank(self, q: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of candidate row keys from the float16 vectors; best ``k`` per query
        (``index.ann.rerank``: row-by-row arithmetic, ties by row key = id order)."""
        return rerank(self._vectors, self.metric, q, keys, k)

    def search_exact(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Brute-force top ``k`` over every stored (float16) vector (``index.ann.exact``): the
        reference the recall tool measures the index against."""
        q = self._check_queries(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.count == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        scores, keys = exact_search(q, self._vectors, min(k, self.count), self.metric)
        return self._hits(scores, keys)

    def _hits(
        self, scores: np.ndarray, keys: np.ndarray, fields: Sequence[str] | None = None
    ) -> list[list[Hit]]:
        valid = keys >= 0
        flat = keys[valid]
        flat_keys = pa.array(flat)
        ids = self._rows.ids.take(flat_keys).to_pylist()
        uris = self._rows.uris.take(flat_keys).to_pylist()
        flat_scores = scores[valid].tolist()
        metas = self.metadata_of(flat, fields) if fields else [None] * len(ids)
        out: list[list[Hit]] = []
        pos = 0
        for row in valid:
            count = int(row.sum())
            out.append(
                [
                    Hit(ids[i], uris[i], flat_scores[i], self.shard, metas[i])
                    for i in range(pos, pos + count)
                ]
            )
            pos += count
        return out

    @property
    def metadata_schema(self) -> dict[str, str]:
        """``{column: type}`` of the metadata this version holds."""
        return {} if self._rows.meta is None else self._rows.meta.schema

    def metadata_of(self, keys: np.ndarray, fields: Sequence[str] | None = None) -> list[dict]:
        """The metadata of row ``keys`` (``fields``, default every column this version has;
        a column it lacks, added to the store later, reads as None)."""
        meta = self._rows.meta or Columns(self.count)
        names = list(meta.columns) if fields is None else list(fields)
        return meta.records(np.asarray(keys, np.int64), names)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}), got shape {np.shape(queries)}")
        if not np.isfinite(q).all():
            raise ValueError("queries contain NaN or infinity")
        return np.ascontiguousarray(q)

    # ---- lookups and accounting ---------------------------------------------------------------
    def row_key(self, row_id: str) -> int | None:
        """Row key of an id, or None (binary search over the rows in id order)."""
        ids, order = self._rows.ids, self._rows.order
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            key = mid if order is None else int(order[mid])
            if ids[key].as_py() < row_id:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.count:
            key = lo if order is None else int(order[lo])
            if ids[key].as_py() == row_id:
                return key
        return None

    def row_keys(self, row_ids: list[str]) -> np.ndarray:
        """Row keys of many ids at once (-1 where absent): one hash join, for bulk lookups."""
        if not row_ids or self.count == 0:
            return np.full(len(row_ids), -1, np.int64)
        found = pc.index_in(pa.array(row_ids, pa.string()), value_set=self._rows.ids)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)

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

    def memory_bytes(self) -> int:
        """Bytes this version holds in RAM: the index (codes, ids, centroids, tables) and the
        row ids/uris/metadata. The memory-mapped float16 vectors are not counted (page cache)."""
        return index_memory(self._index)["total"] + self._rows.nbytes

    def memory_breakdown(self) -> dict:
        """``index_memory`` of the FAISS index plus the row table and mapped vectors sizes."""
        return {
            **index_memory(self._index),
            "rows": self._rows.nbytes,
            "metadata": 0 if self._rows.meta is None else self._rows.meta.nbytes,
            "vectors_mmap": int(self._vectors.nbytes),
        }


def index_memory(index: faiss.Index) -> dict:
    """Bytes of a FAISS index in RAM by part: ``codes`` and ``ids`` in the inverted lists
    (fast-scan lists count whole blocks of 32, as allocated), ``centroids``, ``other``
    (PQ tables, OPQ/PCA matrices, flat vectors) and ``total``."""
    out = {"codes": 0, "ids": 0, "centroids": 0, "other": 0}
    while isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            t = index.chain.at(i)
            out["other"] += t.d_in * t.d_out * 4
        index = faiss.downcast_index(index.index)
    ivf = find_ivf(index)
    if ivf is None:
        out["other"] += index.ntotal * index.d * 4 if hasattr(index, "get_xb") else 0
    else:
        out["centroids"] += ivf.quantizer.ntotal * ivf.d * 4
        pq = getattr(ivf, "pq", None)
        out["other"] += pq.centroids.size() * 4 if pq is not None else 0  # PQ codebooks
        invlists = ivf.invlists
        block = faiss.downcast_InvertedLists(invlists)
        block = block if isinstance(block, faiss.BlockInvertedLists) else None
        sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        out["ids"] += int(sizes.sum()) * 8
        if block is not None:
            blocks = (sizes + block.n_per_block - 1) // block.n_per_block
            out["codes"] += int(blocks.sum()) * block.block_size
        else:
            out["codes"] += int(sizes.sum()) * invlists.code_size
    out["total"] = sum(out.values())
    return out


def resolve_version(store: Store, shard: int, version: str | int | None) -> str:
    """A version directory name from a name, a number (the listed directory with it) or None
    (the live one the manifest names)."""
    if isinstance(version, str):
        return version
    if version is None:
        manifest = load_manifest(store)
        if manifest is None:
            raise IndexLoadError(f"{store} has no manifest")
        state = manifest.shards.get(shard)
        if state is None or state.dir is None:
            raise IndexLoadError(f"shard {shard} of {store} has no live index version")
        return state.dir
    names = [n for n in list_versions(store, shard) if version_number(n) == int(version)]
    if not names:
        raise IndexLoadError(f"shard {shard} of {store} has no version {version}")
    return names[0]


def _read_rows(path: Path, count: int) -> _Rows:
    try:
        names = pq.read_schema(path).names
        columns = [KEY, schema.ID, schema.URI]
        if schema.INGESTED_AT in names:
            columns.append(schema.INGESTED_AT)
        columns += metadata_columns(names)
        table = pq.read_table(path, columns=columns)
        meta = Columns.from_arrow(table)
    except (OSError, pa.ArrowException, MetadataError) as e:
        raise IndexLoadError(f"{path}: {e}") from e
    if table.num_rows != count:
        raise IndexLoadError(f"{path}: {table.num_rows} rows, meta says {count}")
    keys = table[KEY].to_numpy()
    if count and not np.array_equal(keys, np.arange(count)):
        raise IndexLoadError(f"{path}: row keys are not 0..n-1 in order")
    ids = table[schema.ID].combine_chunks()
    if schema.INGESTED_AT in table.column_names:
        ingested = ms_of(table[schema.INGESTED_AT])
    else:
        ingested = np.zeros(count, np.int64)
    order = None
    if count > 1 and not pc.all(pc.less(ids[:-1], ids[1:])).as_py():
        order = pc.sort_indices(ids).to_numpy()  # built from arrays not in id order
    return _Rows(
        ids=ids, uris=table[schema.URI].combine_chunks(), ingested=ingested, order=order, meta=meta
    )
