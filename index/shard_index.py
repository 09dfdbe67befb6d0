"""One loaded, read-only version of one shard: approximate search, exact rerank, id lookups.

Search is two steps. The compressed index (IVF+PQ, or Flat for tiny shards) proposes
``candidates`` row keys per query; with ``rerank`` those are rescored exactly against the shard's
float16 vectors (memory-mapped, so only the candidates' pages are read) and the best ``k`` kept.
Exact rescoring is what makes per-shard scores comparable, so ``index.merge.merge_topk`` over
shards gives the same answer as one big index whose candidates contain the same true neighbours.

Search parameters are passed per call (``faiss.SearchParametersIVF``), never set on the shared
index, so concurrent searches with different ``nprobe`` do not race.

Later (issue #5) a shard also has a *delta* (rows embedded after this version was built, searched
exactly) and tombstones (an IDSelector over row keys): ``_candidates`` is the one place where the
compressed index is asked, and the delta's exact hits merge with the reranked base hits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index import schema
from index.build import INDEX_FILE, KEY, META_FILE, ROWS_FILE, VECTORS_FILE, file_digest
from index.hits import Hit
from index.manifest import load_manifest
from index.rerank import rerank
from index.store import Store

__all__ = ["Hit", "IndexLoadError", "ShardIndex", "index_memory"]

EXACT_CHUNK_ELEMENTS = 4_000_000  # float32 elements per brute-force step (~16 MB)
MAX_DEFAULT_CANDIDATES = 10_000


class IndexLoadError(RuntimeError):
    """A version directory is missing, incomplete or corrupt; it is refused, never half-used."""


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
    ids: np.ndarray  # bytes ("S") array by row key; sorted when built by build_shard
    uris: pa.Array
    order: np.ndarray | None = None  # argsort of ids when they are not sorted
    sorted_ids: np.ndarray | None = None  # ids[order] in that case


class ShardIndex:
    """A shard's version, loaded; thread-safe for concurrent ``search`` calls."""

    def __init__(
        self,
        shard: int,
        version: int,
        meta: dict,
        index: faiss.Index,
        rows: _Rows,
        vectors: np.ndarray,
        directory: Path,
    ):
        self.shard = shard
        self.version = version
        self.meta = meta
        self.count = int(meta["count"])
        self.dim = int(meta["dim"])
        self.metric = meta["metric"]
        self.directory = directory
        self._index = index
        self._rows = rows
        self._vectors = vectors
        self._ivf = _find_ivf(index)

    def __repr__(self) -> str:
        return (
            f"ShardIndex(shard={self.shard}, version={self.version}, count={self.count}, "
            f"factory={self.meta['factory']!r})"
        )

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def load(
        cls, store: Store, shard: int, version: int | None = None, *, verify: bool = True
    ) -> ShardIndex:
        """Load ``version`` of ``shard`` (None: the live one named by the manifest).

        ``verify`` checks every file's size and SHA-256 against ``meta.json`` (a corrupt or
        truncated file raises IndexLoadError); ``verify=False`` checks sizes only.
        """
        if version is None:
            manifest = load_manifest(store)
            if manifest is None:
                raise IndexLoadError(f"{store} has no manifest")
            state = manifest.shards.get(shard)
            if state is None or state.version is None:
                raise IndexLoadError(f"shard {shard} of {store} has no live index version")
            version = state.version
        remote = store.index_version_dir(shard, version)
        if not store.exists(remote):
            raise IndexLoadError(f"index version {remote} does not exist")
        try:
            directory = store.local_dir(remote)
        except (OSError, FileNotFoundError) as e:
            raise IndexLoadError(f"could not fetch {remote}: {e}") from e
        return cls.open_dir(directory, shard=shard, version=version, verify=verify)

    @classmethod
    def open_dir(
        cls, directory: str | Path, *, shard: int = -1, version: int = -1, verify: bool = True
    ) -> ShardIndex:
        """Load a version directory on the local filesystem (what ``load`` does after fetching)."""
        directory = Path(directory)
        meta = _read_meta(directory)
        _check_files(directory, meta, verify)
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
        return cls(
            meta.get("shard", shard) if shard < 0 else shard,
            meta.get("version", version) if version < 0 else version,
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
    ) -> list[list[Hit]]:
        """Top ``k`` hits of each query (one list per query, best first, up to ``k`` long).

        ``nprobe`` (default: the version's ``meta.nprobe``) is the number of IVF lists visited;
        ``candidates`` (default: the number the build measured for recall, see ``index.tune``,
        scaled with k; ``max(4k, 100)`` for older versions) how many compressed-index results are
        rescored exactly when ``rerank``. Without rerank, scores are the index's approximations.
        ``exclude`` selects row keys to hide (deleted or superseded rows, ``index.delta``); it is
        applied inside the FAISS search, so up to ``k`` visible rows still come back.
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
        return self._hits(scores, keys)

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
        (``index.rerank``: row-by-row arithmetic, ties by row key = id order)."""
        return rerank(self._vectors, self.metric, q, keys, k)

    def search_exact(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Brute-force top ``k`` over every stored (float16) vector: the reference the recall
        tool measures the index against, and the shape of a future delta search."""
        q = self._check_queries(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.count == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        k = min(k, self.count)
        best_s = np.full((len(q), 0), 0, np.float32)
        best_k = np.full((len(q), 0), 0, np.int64)
        step = max(1, EXACT_CHUNK_ELEMENTS // self.dim)
        q_norm = np.square(q).sum(axis=1, keepdims=True)
        for start in range(0, self.count, step):
            x = np.asarray(self._vectors[start : start + step], dtype=np.float32)
            dots = q @ x.T
            if self.metric == "ip":
                s = dots
            else:
                s = np.maximum(q_norm - 2 * dots + np.square(x).sum(axis=1)[None, :], 0)
            primary = -s if self.metric == "ip" else s
            if s.shape[1] > k:  # keep each query's k best of this chunk, then merge
                top = np.argpartition(primary, k - 1, axis=1)[:, :k]
                s = np.take_along_axis(s, top, axis=1)
                keys = top + start
            else:
                keys = np.broadcast_to(np.arange(start, start + len(x)), s.shape)
            best_s = np.concatenate([best_s, s], axis=1)
            best_k = np.concatenate([best_k, keys], axis=1)
            primary = -best_s if self.metric == "ip" else best_s
            order = np.lexsort((best_k, primary), axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, order, axis=1)
            best_k = np.take_along_axis(best_k, order, axis=1)
        return self._hits(best_s, best_k)

    def _hits(self, scores: np.ndarray, keys: np.ndarray) -> list[list[Hit]]:
        valid = keys >= 0
        flat_keys = keys[valid]
        ids = self._rows.ids[flat_keys]
        uris = self._rows.uris.take(pa.array(flat_keys)).to_pylist()
        flat_scores = scores[valid].tolist()
        out: list[list[Hit]] = []
        pos = 0
        for row in valid:
            count = int(row.sum())
            out.append(
                [
                    Hit(ids[i].decode(), uris[i], flat_scores[i], self.shard)
                    for i in range(pos, pos + count)
                ]
            )
            pos += count
        return out

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
        """Row key of an id, or None (binary search: rows are stored in id order)."""
        raw = row_id.encode()
        ids = self._rows.ids
        if self.count == 0 or len(raw) > ids.dtype.itemsize:
            return None
        sorted_ids = ids if self._rows.order is None else self._rows.sorted_ids
        pos = int(np.searchsorted(sorted_ids, np.array(raw, dtype=ids.dtype)))
        if pos < self.count and sorted_ids[pos] == raw:
            return pos if self._rows.order is None else int(self._rows.order[pos])
        return None

    def vector_of(self, row_id: str) -> np.ndarray | None:
        """The stored vector of ``row_id`` as float32 (from float16), or None if not here."""
        key = self.row_key(row_id)
        return None if key is None else np.asarray(self._vectors[key], dtype=np.float32)

    def uri_of(self, row_id: str) -> str | None:
        """The stored uri of ``row_id``, or None if not here (``GET /images/{id}``)."""
        key = self.row_key(row_id)
        return None if key is None else self._rows.uris[key].as_py()

    def memory_bytes(self) -> int:
        """Bytes this version holds in RAM: the index (codes, ids, centroids, tables) and the
        row ids/uris. The memory-mapped float16 vectors are not counted (page cache)."""
        return index_memory(self._index)["total"] + self._rows.ids.nbytes + self._rows.uris.nbytes

    def memory_breakdown(self) -> dict:
        """``index_memory`` of the FAISS index plus the row table and mapped vectors sizes."""
        return {
            **index_memory(self._index),
            "rows": self._rows.ids.nbytes + self._rows.uris.nbytes,
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
    ivf = _find_ivf(index)
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


def _find_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def check_version_dir(directory: str | Path, verify: bool = True) -> dict:
    """What ``load`` refuses, without loading: meta.json readable, every file present with its
    size (and SHA-256 when ``verify``). Returns the meta; raises IndexLoadError."""
    directory = Path(directory)
    meta = _read_meta(directory)
    _check_files(directory, meta, verify)
    return meta


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise IndexLoadError(f"{path} is missing: not a complete index version") from e
    except (OSError, ValueError) as e:
        raise IndexLoadError(f"{path}: unreadable: {e}") from e
    missing = [k for k in ("count", "dim", "metric", "factory", "files") if k not in meta]
    if missing:
        raise IndexLoadError(f"{path} lacks {missing}")
    return meta


def _check_files(directory: Path, meta: dict, verify: bool) -> None:
    for name in (INDEX_FILE, ROWS_FILE, VECTORS_FILE):
        expected = meta["files"].get(name)
        path = directory / name
        if expected is None or not path.exists():
            raise IndexLoadError(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise IndexLoadError(f"{path}: {size} bytes, meta.json says {expected['bytes']}")
        if verify and file_digest(path)["sha256"] != expected["sha256"]:
            raise IndexLoadError(f"{path}: checksum mismatch, the file is corrupt")


def _read_rows(path: Path, count: int) -> _Rows:
    try:
        table = pq.read_table(path, columns=[KEY, schema.ID, schema.URI])
    except (OSError, pa.ArrowException) as e:
        raise IndexLoadError(f"{path}: {e}") from e
    if table.num_rows != count:
        raise IndexLoadError(f"{path}: {table.num_rows} rows, meta says {count}")
    keys = table[KEY].to_numpy()
    if count and not np.array_equal(keys, np.arange(count)):
        raise IndexLoadError(f"{path}: row keys are not 0..n-1 in order")
    ids = pc.cast(table[schema.ID].combine_chunks(), pa.binary()).to_numpy(zero_copy_only=False)
    ids = np.array(list(ids), dtype="S") if count else np.array([], dtype="S1")
    order = sorted_ids = None
    if count > 1 and not (ids[1:] > ids[:-1]).all():
        order = np.argsort(ids, kind="stable")  # built from arrays not in id order
        sorted_ids = ids[order]
    return _Rows(
        ids=ids, uris=table[schema.URI].combine_chunks(), order=order, sorted_ids=sorted_ids
    )
