"""Build one index version from arrays: vectors + ids + uris in, a local version directory out.

This is the algorithm alone, as faiss/contrib keeps them: no store, no manifest, no Ray. It writes
the files of ``index.storage.versions`` into a local directory (``rows.parquet``, ``vectors.npy``,
``index.faiss``, then ``meta.json`` last, with the size and SHA-256 of the others). Reading a
shard's rows from the store, publishing the directory under a unique name and committing it to
the manifest are ``index.live.rebuild``'s and ``index.storage.publish``'s jobs.

Row key ``i`` is row ``i`` of the arrays (``index.live.rebuild`` passes rows sorted by id, so the
same
data gives the same row keys whatever order the parts were listed or written in).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.ann.ivf_lists import exact_quantizer, graph_quantizer
from index.ann.policy import HNSW_QUANTIZER_EF_CONSTRUCTION, IndexSpec, choose_index
from index.ann.tune import find_ivf, tune_defaults
from index.rows import schema
from index.storage.store import fsync_path
from index.storage.versions import (
    INDEX_FILE,
    KEY,
    META_FILE,
    ROWS_FILE,
    VECTORS_FILE,
    file_digest,
    write_json,
)

META_FORMAT = 2
ADD_CHUNK = 65_536

Stage = Callable[[str], None]


def faiss_metric(metric: str) -> int:
    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")


def build_arrays(
    vectors: np.ndarray,
    ids: Sequence[str] | pa.Array,
    uris: Sequence[str] | pa.Array,
    out_dir: str | os.PathLike[str],
    spec: IndexSpec | None,
    metric: str,
    *,
    extra: pa.Table | None = None,
    memory_budget: str | int = "4G",
    seed: int = 0,
    tune: bool = True,
    extra_meta: dict | None = None,
    on_stage: Stage | None = None,
    trained: faiss.Index | None = None,
) -> dict:
    """Write a complete version directory for these rows into the local directory ``out_dir``.

    Row key ``i`` is row ``i`` of the arrays. ``spec=None`` applies the policy rules.
    ``extra`` (same length) holds metadata columns stored in ``rows.parquet``. ``tune`` measures
    the built index for its default nprobe and rerank candidates (``index.ann.tune``); without it
    the spec's defaults stand. ``on_stage`` is called with "rows", "trained", "added", "tuned"
    and "index" as each step finishes (progress reports;
    the crash tests use it to stop a build at a known point). ``trained`` is an already trained
    index of ``spec``'s structure (a rebuild reusing the live version's quantizer and codebooks,
    ``index.live.rebuild``): it is copied, emptied and filled, with no training. Returns the meta
    dict written.
    """
    t0 = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected (n, dim) vectors, got shape {vectors.shape}")
    n, dim = vectors.shape
    if len(ids) != n or len(uris) != n or (extra is not None and extra.num_rows != n):
        raise ValueError("ids, uris, extra and vectors must have the same number of rows")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinity")
    spec = spec or choose_index(n, dim, metric, memory_budget)
    stage = on_stage or (lambda _name: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    columns = {KEY: pa.array(np.arange(n, dtype=np.int64)), schema.ID: ids, schema.URI: uris}
    rows = pa.table(
        {k: v if isinstance(v, pa.Array) else pa.array(v, pa.string()) for k, v in columns.items()}
    )
    if extra is not None:
        for name in extra.column_names:
            rows = rows.append_column(extra.schema.field(name), extra[name])
    pq.write_table(rows, out / ROWS_FILE, compression="zstd")
    vectors16 = vectors.astype(np.float16)
    _save_npy(out / VECTORS_FILE, vectors16)
    stage("rows")

    if trained is not None:
        index = faiss.clone_index(trained)
        index.reset()  # keeps the coarse quantizer and PQ codebooks, drops the codes
    else:
        index = faiss.index_factory(dim, spec.factory, faiss_metric(metric))
    with exact_lists(index):
        t_train = time.perf_counter()
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=min(spec.train_size, n), replace=False))
            index.train(vectors[sample])
        train_s = time.perf_counter() - t_train
        stage("trained")

        t_add = time.perf_counter()
        for start in range(0, n, ADD_CHUNK):
            block = vectors[start : start + ADD_CHUNK]
            if spec.kind == "flat":
                index.add(block)  # flat ids are positions, which are the row keys
            else:
                index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
        add_s = time.perf_counter() - t_add
    stage("added")

    tuning = tune_defaults(index, vectors, vectors16, metric, spec, seed=seed) if tune else None
    del vectors16
    if tuning is not None:
        spec = dataclasses.replace(
            spec,
            nprobe=tuning["nprobe"],
            candidates=tuning["candidates"],
            reasons=[*spec.reasons, tuning["reason"]],
        )
    stage("tuned")

    faiss.write_index(index, str(out / INDEX_FILE))
    fsync_path(out / INDEX_FILE)
    stage("index")

    meta = {
        "format": META_FORMAT,
        "kind": spec.kind,
        "factory": spec.factory,
        "metric": metric,
        "dim": dim,
        "count": n,
        "nlist": spec.nlist,
        "pq_m": spec.pq_m,
        "nbits": spec.nbits,
        "train_size": min(spec.train_size, n) if spec.kind != "flat" else 0,
        "nprobe": spec.nprobe,
        "candidates": spec.candidates,
        "spec": spec.to_dict(),
        "tuning": tuning,
        "seed": seed,
        "faiss_version": faiss.__version__,
        "created_at": time.time(),
        "build_seconds": {
            "train": round(train_s, 3),
            "add": round(add_s, 3),
            "tune": tuning["seconds"] if tuning else 0.0,
            "total": round(time.perf_counter() - t0, 3),
        },
        # every file of the directory (a caller may add its own, e.g. tombstones.parquet)
        "files": {
            f.name: file_digest(f)
            for f in sorted(out.iterdir())
            if f.is_file() and f.name != META_FILE and not f.name.startswith(".")
        },
        **(extra_meta or {}),
    }
    write_json(out / META_FILE, meta)  # last: a directory without it is not a version
    return meta


@contextmanager
def exact_lists(index: faiss.Index):
    """Train and fill an IVF whose coarse quantizer is an HNSW graph (``index.ann.policy``)
    with the exact scan of its centroids in the graph's place; the graph is built (or kept, for
    an index already trained) when they are, and serves the searches only. Rows put in the
    list the graph guesses for them, not their nearest, are lost to every query that probes the
    right lists: on the 10M x 256 store, filled through the graph (efSearch 16), recall@10 at
    400 candidates fell to 0.9825 even with exact list choice at search (0.9892 filled by scan).
    """
    ivf = find_ivf(index)
    graph = None if ivf is None else graph_quantizer(ivf)
    if graph is None:
        yield
        return
    # trained already (a rebuild reusing the live version's quantizer): the graph's own centroids
    trained = graph.ntotal > 0
    scan = exact_quantizer(ivf) if trained else faiss.IndexFlat(ivf.d, graph.metric_type)
    owns = ivf.own_fields
    ivf.own_fields = False  # neither is the IVF's to free meanwhile; ``graph`` keeps the graph
    ivf.quantizer = scan
    try:
        yield
    finally:
        if not trained and scan.ntotal:  # trained here: the graph gets k-means's centroids
            graph.hnsw.efConstruction = HNSW_QUANTIZER_EF_CONSTRUCTION
            graph.add(scan.reconstruct_n(0, scan.ntotal))
        ivf.quantizer = graph
        ivf.own_fields = owns


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
