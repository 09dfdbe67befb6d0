"""Recall tool: how many true neighbours a store's shard indexes find, over nprobe.

For a store and a query set it measures recall@k of three searches, scattered over every shard
and merged exactly as the service does (``merge_topk``):

- ``ivfpq``: the compressed index alone (approximate scores),
- ``ivfpq_rerank``: its top ``candidates`` per shard rescored exactly with the float16 vectors,
- ``exact``: brute force over the stored float16 vectors (what rerank can at best reach; its
  gap to 1.0 is what storing float16 instead of float32 costs).

Ground truth: the query file's own exact neighbours (ann-benchmarks HDF5: ``test`` +
``neighbors``, whose row numbers become ids through ``--id-template``), or, for a ``.npy`` of
queries, exact float32 search over the store's Parquet embeddings (the source of truth).

    python -m index.live.recall --store /data/store --queries queries.npy --k 10 \
        --nprobe 1,2,4,8,16,32 --out recall      # writes recall.json and recall.png

No Ray: it runs wherever the store is readable.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from index.ann.exact import exact_search
from index.ann.shard_index import ShardIndex
from index.ann.transform import load_transform
from index.live.rebuild import read_rows, read_tombstones
from index.query.hits import Hit
from index.query.merge import merge_topk
from index.rows import schema
from index.rows.visibility import read_visible
from index.storage.coverage import plan_shard
from index.storage.manifest import load_manifest
from index.storage.store import Store

DEFAULT_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)


def load_queries(path: str | Path, id_template: str = "{}") -> tuple[np.ndarray, list | None]:
    """Queries (float32) and, from an HDF5 file, the ids of their exact neighbours."""
    path = Path(path)
    if path.suffix in (".hdf5", ".h5"):
        import h5py

        with h5py.File(path, "r") as f:
            queries = np.asarray(f["test"], dtype=np.float32)
            neighbors = np.asarray(f["neighbors"]) if "neighbors" in f else None
            distance = f.attrs.get("distance", "")
        distance = distance.decode() if isinstance(distance, bytes) else str(distance)
        if distance == "angular":
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        truth = None
        if neighbors is not None:
            truth = [[id_template.format(int(i)) for i in row] for row in neighbors]
        return queries, truth
    queries = np.load(path).astype(np.float32)
    return queries, None


def exact_truth(store: Store, queries: np.ndarray, k: int) -> list[list[str]]:
    """Exact float32 top-k ids over every visible row of the store's Parquet (the rows a build
    of each shard would read: ``index.live.rebuild``), merged over shards. ``queries`` are in
    the model's space; with a store transform (``index.ann.transform``) rows and queries are
    compared in the store's space, the one its indexes approximate."""
    manifest = load_manifest(store)
    if manifest is None:
        raise ValueError(f"{store} has no manifest")
    transform = load_transform(store, manifest)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    q = q if transform is None else transform.apply(q)
    per_shard = []
    for shard in range(manifest.num_shards):
        plan = plan_shard(store, shard, manifest)
        table, _ = read_visible(read_rows(store, plan, manifest.dim), read_tombstones(store, plan))
        if table.num_rows == 0:
            continue
        vectors = schema.arrow_to_vectors(table[schema.EMBEDDING])
        vectors = vectors if transform is None else transform.apply(vectors)
        ids = table[schema.ID].combine_chunks()
        scores, rows = exact_search(q, vectors, min(k, len(vectors)), manifest.metric)
        per_shard.append(
            [
                [
                    Hit(ids[int(r)].as_py(), "", float(sc), shard)
                    for sc, r in zip(s, r_, strict=True)
                    if r >= 0
                ]
                for s, r_ in zip(scores, rows, strict=True)
            ]
        )
    return [
        [h.id for h in merge_topk([p[i] for p in per_shard], k, manifest.metric)]
        for i in range(len(q))
    ]


def recall_at_k(found: Sequence[Sequence[str]], truth: Sequence[Sequence[str]], k: int) -> float:
    """Mean over queries of |found[:k] & truth[:k]| / k."""
    if len(found) != len(truth):
        raise ValueError(f"{len(found)} results for {len(truth)} ground-truth rows")
    if not found:
        return float("nan")
    total = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth, strict=True))
    return total / (k * len(found))


def search_all(
    shards: Sequence[ShardIndex], queries: np.ndarray, k: int, **kwargs
) -> list[list[str]]:
    """Scatter to every shard, merge exactly: ids of the global top-k per query."""
    metric = shards[0].metric
    per_shard = [s.search(queries, k, **kwargs) for s in shards]
    return [
        [h.id for h in merge_topk([p[q] for p in per_shard], k, metric)]
        for q in range(len(queries))
    ]


def exact_all(shards: Sequence[ShardIndex], queries: np.ndarray, k: int) -> list[list[str]]:
    metric = shards[0].metric
    per_shard = [s.search_exact(queries, k) for s in shards]
    return [
        [h.id for h in merge_topk([p[q] for p in per_shard], k, metric)]
        for q in range(len(queries))
    ]


def sweep(
    shards: Sequence[ShardIndex],
    queries: np.ndarray,
    truth: Sequence[Sequence[str]],
    k: int = 10,
    nprobes: Sequence[int] = DEFAULT_NPROBES,
    candidates: int | None = None,
    with_exact: bool = True,
    progress: bool = False,
) -> dict:
    """Recall@k of IVF+PQ, IVF+PQ + rerank and exact search, for each nprobe.

    ``with_exact=False`` skips the brute-force pass (its recall does not depend on nprobe).
    ``progress`` shows a bar over the nprobe values (the command line does).

    nprobe values above the largest nlist are dropped; the shards' default nprobe is added.
    Timings are milliseconds per query for the whole scatter-gather in this process.
    """
    max_nlist = max(s.nlist for s in shards)
    defaults = sorted({s.default_nprobe for s in shards if s.nlist})
    values = sorted({p for p in nprobes if p <= max(1, max_nlist)} | set(defaults))
    exact_recall = exact_ms = None
    if with_exact:
        t = time.perf_counter()
        exact_recall = recall_at_k(exact_all(shards, queries, k), truth, k)
        exact_ms = (time.perf_counter() - t) * 1000 / len(queries)
    curve = []
    if progress:
        from tqdm import tqdm

        values = tqdm(values, desc="nprobe sweep", unit="nprobe")
    for nprobe in values:
        point = {"nprobe": nprobe}
        for label, rerank in (("ivfpq", False), ("ivfpq_rerank", True)):
            t = time.perf_counter()
            found = search_all(
                shards, queries, k, nprobe=nprobe, rerank=rerank, candidates=candidates
            )
            point[f"ms_per_query_{label}"] = (time.perf_counter() - t) * 1000 / len(queries)
            point[f"recall_{label}"] = recall_at_k(found, truth, k)
        curve.append(point)
    return {
        "k": k,
        "queries": len(queries),
        "candidates": candidates,
        "default_nprobe": defaults[0] if len(defaults) == 1 else defaults,
        "recall_exact": exact_recall,
        "ms_per_query_exact": exact_ms,
        "curve": curve,
    }


def plot(result: dict, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    xs = [p["nprobe"] for p in curve]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [p["recall_ivfpq"] for p in curve], "o--", label="IVF+PQ")
    ax.plot(xs, [p["recall_ivfpq_rerank"] for p in curve], "o-", label="IVF+PQ + exact rerank")
    if result.get("recall_exact") is not None:
        ax.axhline(result["recall_exact"], color="grey", ls=":", label="exact (float16 vectors)")
    defaults = result.get("default_nprobe")
    for d in defaults if isinstance(defaults, list) else [defaults]:
        if d:
            ax.axvline(d, color="green", ls="-.", alpha=0.5, label=f"default nprobe {d}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("nprobe (lists visited per shard)")
    ax.set_ylabel(f"recall@{result['k']}")
    ax.set_ylim(min(0.5, min(p["recall_ivfpq"] for p in curve) - 0.05), 1.005)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"recall@{result['k']} over nprobe")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="recall@k of a store's shard indexes")
    parser.add_argument("--store", required=True, help="store root URI")
    parser.add_argument("--queries", required=True, help=".npy of queries, or ann HDF5")
    parser.add_argument("--ground-truth", help=".npy of true neighbour row numbers (optional)")
    parser.add_argument("--id-template", default="{}", help="row number -> id, e.g. '{}'")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", default=",".join(map(str, DEFAULT_NPROBES)))
    parser.add_argument("--candidates", type=int, default=None, help="per shard, for rerank")
    parser.add_argument("--limit", type=int, default=None, help="use the first N queries")
    parser.add_argument("--out", default="recall", help="output prefix: <out>.json, <out>.png")
    args = parser.parse_args(argv)

    store = Store(args.store)
    manifest = load_manifest(store)
    if manifest is None:
        parser.error(f"{args.store} has no manifest")
    queries, truth = load_queries(args.queries, args.id_template)
    if args.ground_truth:
        rows = np.load(args.ground_truth)
        truth = [[args.id_template.format(int(i)) for i in row] for row in rows]
    if args.limit:
        queries = queries[: args.limit]
        truth = truth[: args.limit] if truth is not None else None
    if truth is None:
        truth = exact_truth(store, queries, args.k)
    shards = [ShardIndex.load(store, s) for s in range(manifest.num_shards)]
    transform = load_transform(store, manifest)  # the versions hold the store's space
    queries = queries if transform is None else transform.apply(queries)
    result = sweep(
        shards,
        queries,
        truth,
        k=args.k,
        nprobes=[int(p) for p in args.nprobe.split(",") if p],
        candidates=args.candidates,
        progress=True,
    )
    result.update(
        store=store.uri,
        queries_file=str(args.queries),
        shards=[
            {"shard": s.shard, "version": s.version, "count": s.count, "factory": s.meta["factory"]}
            for s in shards
        ],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"), f"recall@{args.k}: {Path(args.queries).name}")
    best = max(result["curve"], key=lambda p: p["recall_ivfpq_rerank"])
    print(
        f"recall@{args.k}: exact {result['recall_exact']:.4f}; best IVF+PQ+rerank "
        f"{best['recall_ivfpq_rerank']:.4f} at nprobe {best['nprobe']}; "
        f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}"
    )
    return result


if __name__ == "__main__":
    main()
