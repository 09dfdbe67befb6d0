"""Fewer bytes per vector at the same recall: which codes and which rerank vectors the build
policy should pick, measured on a Gaussian mixture and on the real CNN embeddings.

For each compressed code (today's IVF + 4-bit PQ fast scan at ``dim/4`` and ``dim/8`` bytes,
FAISS RaBitQ 1-bit with 4- and 8-bit queries, its fast-scan variant, RaBitQ 2-bit, SQ4, SQ8),
built with the policy's nlist and training sample: RAM bytes per vector (codes + 8-byte ids in
the inverted lists, as ``index.ann.memory`` counts them; the centroids are a fixed cost, given
apart), build seconds, and over a grid of nprobe x rerank candidates the recall@10 after exact
rerank and the search + rerank milliseconds per query (a batch of queries, FAISS on 2 threads,
rerank in numpy). Each variant's operating point is the fastest grid point reaching recall@10
>= 0.95; ``chosen_*`` is the variant with the fewest RAM bytes per vector that reaches it.

The rerank vectors are memory-mapped from disk (their bytes are disk bytes, paged in per
candidate): for the chosen code and today's, the same grid is measured with float16 vectors
(today, 2 x dim bytes), SQ8 codes (dim bytes) and a PCA to dim/2 in float16 (dim bytes).

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/bytes_per_vector.py [--n 300000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness.stores import load_ann  # noqa: E402
from harness.synthetic import exact_topk, gaussian_mixture  # noqa: E402
from index.ann.build import faiss_metric  # noqa: E402
from index.ann.memory import index_memory  # noqa: E402
from index.ann.policy import choose_index  # noqa: E402
from index.ann.rerank import best_k  # noqa: E402

TARGET = 0.95
K = 10
NPROBES = (4, 8, 16, 32, 64)
CANDIDATES = (50, 100, 200, 400, 800, 1600)
CHUNK = 2_000_000  # float32 elements decoded per rerank step
REAL = "caltech101-mnv2-1280-angular"


def code_variants(dim: int) -> list[tuple[str, str, int]]:
    """(label, factory suffix after ``IVF{nlist},``, query bits or 0 for the index default)."""
    today, half = _pq_m(dim, dim // 2), _pq_m(dim, dim // 4)  # 4-bit PQ: m = 2 x code bytes
    return [
        (f"PQ{today}x4fsr (today)", f"PQ{today}x4fsr", 0),
        (f"PQ{half}x4fsr", f"PQ{half}x4fsr", 0),
        ("RaBitQ 1-bit, qb=4", "RaBitQ", 4),
        ("RaBitQ 1-bit, qb=8", "RaBitQ", 8),
        ("RaBitQfs 1-bit (fast scan)", "RaBitQfs", 0),
        ("RaBitQ 2-bit, qb=8", "RaBitQ2", 8),
        ("SQ4", "SQ4", 0),
        ("SQ8", "SQ8", 0),
    ]


def _pq_m(dim: int, target: int) -> int:
    return max(m for m in range(1, target + 1) if dim % m == 0)


# ---- rerank stores: what the candidates are rescored with ----------------------------------------
class RerankStore:
    """Full-ish vectors on disk to rescore candidates: float16, SQ8 codes or PCA float16."""

    def __init__(self, kind: str, base: np.ndarray, seed: int = 0):
        self.kind = kind
        dim = base.shape[1]
        sample = base[np.random.default_rng(seed).choice(len(base), min(len(base), 65536), False)]
        if kind == "float16":
            self.data = base.astype(np.float16)
        elif kind == "sq8":
            self.sq = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit)
            self.sq.train(sample)
            self.data = self.sq.compute_codes(base)
        elif kind == "pca-half-float16":
            self.pca = faiss.PCAMatrix(dim, dim // 2)
            self.pca.train(sample)
            a = faiss.vector_to_array(self.pca.A).reshape(dim // 2, dim)
            self.projection = a.T.astype(np.float32)
            self.data = self.pca.apply(base).astype(np.float16)
        else:
            raise ValueError(kind)
        extra = 0 if kind != "pca-half-float16" else dim * dim // 2 * 4
        self.disk_bytes_per_vector = self.data.nbytes / len(base) + extra / len(base)

    def queries(self, q: np.ndarray, metric: str) -> np.ndarray:
        """Queries in the store's space (PCA: projected without centring for ip, so the dropped
        mean term is the same for every row of a query; centred for l2)."""
        if self.kind != "pca-half-float16":
            return q
        return q @ self.projection if metric == "ip" else self.pca.apply(q)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        if self.kind == "sq8":
            return self.sq.decode(self.data[rows])
        return self.data[rows].astype(np.float32)


def rerank(store: RerankStore, metric: str, q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Top-K row keys of each query's candidates by the store's score (-1 keys last)."""
    q = store.queries(q, metric)
    nq, n = keys.shape
    dim = store.data.shape[1] if store.kind != "sq8" else q.shape[1]
    scores = np.empty((nq, n), np.float32)
    step = max(1, CHUNK // max(1, n * dim))
    for s in range(0, nq, step):
        block = keys[s : s + step]
        x = store.decode(np.maximum(block, 0).ravel()).reshape(len(block), n, -1)
        qb = q[s : s + step, None, :]
        sc = (x * qb).sum(axis=2) if metric == "ip" else np.square(x - qb).sum(axis=2)
        sc[block < 0] = -np.inf if metric == "ip" else np.inf
        scores[s : s + step] = sc
    return best_k(scores, keys, metric, K)[1]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(
        len(set(f[:K].tolist()) & set(t[:K].tolist())) for f, t in zip(found, truth, strict=True)
    )
    return hits / (K * len(truth))


# ---- one code variant ----------------------------------------------------------------------------
def build(label, suffix, qb, data, nlist, train) -> tuple[faiss.Index, dict]:
    """The variant's index over the data's base vectors, and its row (sizes, build time)."""
    base, metric = data["base"], data["metric"]
    n, dim = base.shape
    factory = f"IVF{nlist},{suffix}"
    index = faiss.index_factory(dim, factory, faiss_metric(metric))
    t0 = time.perf_counter()
    sample = np.sort(np.random.default_rng(0).choice(n, min(train, n), replace=False))
    index.train(base[sample])
    index.add_with_ids(base, np.arange(n, dtype=np.int64))
    build_s = time.perf_counter() - t0
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if qb:
        ivf.qb = qb  # the query bits of RaBitQ's distance estimate
    mem = index_memory(index)
    return index, {
        "variant": label,
        "factory": factory,
        "qb": int(getattr(ivf, "qb", 0)) or None,
        "build_seconds": round(build_s, 2),
        "ram_bytes_per_vector": round((mem["codes"] + mem["ids"]) / n, 2),
        "code_bytes_per_vector": round(mem["codes"] / n, 2),
        "fixed_bytes": int(mem["centroids"] + mem["other"]),
    }


def grid(index, data, stores, nlist) -> list[dict]:
    """recall@10 and ms/query over nprobe x candidates, reranked with each store."""
    queries, truth, metric = data["queries"], data["truth"], data["metric"]
    ladder = [c for c in CANDIDATES if c <= len(data["base"]) // 8]
    points = []
    for nprobe in [p for p in NPROBES if p <= nlist]:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        index.search(queries[:20], ladder[-1], params=params)  # warm
        for c in ladder:
            t = time.perf_counter()
            _, keys = index.search(queries, c, params=params)
            search_ms = (time.perf_counter() - t) * 1000 / len(queries)
            point = {"nprobe": nprobe, "candidates": c, "search_ms": round(search_ms, 4)}
            point["recall_no_rerank"] = round(recall(keys, truth), 4)
            for store in stores:
                t = time.perf_counter()
                top = rerank(store, metric, queries, keys)
                ms = search_ms + (time.perf_counter() - t) * 1000 / len(queries)
                point[f"recall_{store.kind}"] = round(recall(top, truth), 4)
                point[f"ms_{store.kind}"] = round(ms, 4)
            points.append(point)
            if min(point[f"recall_{s.kind}"] for s in stores) >= 0.999:
                break  # more candidates cannot help
    return points


def describe(label: str, row: dict, kind: str) -> None:
    best = row[f"at_target_{kind}"]
    reached = (
        f"recall {best['recall']:.3f} at nprobe {best['nprobe']}, {best['candidates']} cand, "
        f"{best['ms']:.3f} ms/q"
        if best["reached"]
        else f"best recall {best['recall']:.3f} (target {TARGET} not reached)"
    )
    print(
        f"{label:28s} {kind:17s} {row['ram_bytes_per_vector']:7.1f} B/vec  "
        f"build {row['build_seconds']:6.1f} s  {reached}",
        flush=True,
    )


def operating_point(grid: list[dict], kind: str) -> dict:
    """The fastest grid point reaching the target recall, else the most accurate one."""
    reached = [p for p in grid if p[f"recall_{kind}"] >= TARGET]
    pick = (
        min(reached, key=lambda p: p[f"ms_{kind}"])
        if reached
        else max(grid, key=lambda p: p[f"recall_{kind}"])
    )
    return {
        "reached": bool(reached),
        "nprobe": pick["nprobe"],
        "candidates": pick["candidates"],
        "recall": pick[f"recall_{kind}"],
        "ms": pick[f"ms_{kind}"],
    }


def run_dataset(data: dict, variants, rerank_kinds) -> dict:
    """Every code variant with float16 rerank, then every rerank store for today's code and the
    chosen one; returns the rows, the chosen variant and the rerank stores' comparison."""
    n, dim = data["base"].shape
    spec = choose_index(n, dim, data["metric"], "64G")
    nlist, train = spec.nlist, spec.train_size
    fp16 = RerankStore("float16", data["base"])
    rows, indexes = [], {}
    for label, suffix, qb in variants:
        index, row = build(label, suffix, qb, data, nlist, train)
        row["grid"] = grid(index, data, [fp16], nlist)
        row["at_target_float16"] = operating_point(row["grid"], "float16")
        describe(label, row, "float16")
        rows.append(row)
        indexes[label] = index
    ok = [r for r in rows if r["at_target_float16"]["reached"]]
    chosen = min(ok, key=lambda r: (r["ram_bytes_per_vector"], r["at_target_float16"]["ms"]))
    chosen = chosen if ok else None
    stores = [fp16] + [RerankStore(kind, data["base"]) for kind in rerank_kinds]
    compared = []
    for row in {r["variant"]: r for r in [rows[0], chosen] if r is not None}.values():
        points = grid(indexes[row["variant"]], data, stores, nlist)
        out = {"variant": row["variant"], "stores": {}, "grid": points}
        for s in stores:
            at = operating_point(points, s.kind)
            out["stores"][s.kind] = {
                "disk_bytes_per_vector": round(s.disk_bytes_per_vector, 2),
                **at,
            }
            describe(row["variant"], {**row, f"at_target_{s.kind}": at}, s.kind)
        compared.append(out)
    return {
        "n": n,
        "dim": dim,
        "queries": len(data["queries"]),
        "metric": data["metric"],
        "nlist": nlist,
        "train_size": train,
        "chosen": chosen["variant"] if chosen else None,
        "variants": rows,
        "rerank_stores": compared,
    }


def synthetic(n: int, dim: int, nq: int) -> dict:
    x = gaussian_mixture(n + nq, dim, seed=1)
    t = time.perf_counter()
    truth = exact_topk(x[:n], x[n:], K, "ip")
    print(f"exact top-{K} of {nq} queries over {n:,} in {time.perf_counter() - t:.1f} s")
    return {"base": x[:n], "queries": x[n:], "truth": truth, "metric": "ip"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-real", action="store_true", help="skip the CNN embeddings")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    kinds = ["sq8", "pca-half-float16"]

    print(f"Gaussian mixture {args.n:,} x {args.dim}-d, {args.queries} queries")
    mixture = run_dataset(synthetic(args.n, args.dim, args.queries), code_variants(args.dim), kinds)
    result: dict = {"command": common.command("bytes_per_vector", argv)}
    by_name = {r["variant"]: r for r in mixture["variants"]}
    chosen = by_name.get(mixture["chosen"])
    today = mixture["variants"][0]
    result["chosen_ram_bytes_per_vector"] = chosen["ram_bytes_per_vector"] if chosen else None
    result["chosen_codes"] = mixture["chosen"]
    if chosen:
        point = chosen["at_target_float16"]
        result.update(
            chosen_recall_at_10=point["recall"],
            chosen_ms_per_query=point["ms"],
            chosen_nprobe=point["nprobe"],
            chosen_candidates=point["candidates"],
            chosen_build_seconds=chosen["build_seconds"],
        )
    add_policy_keys(result)
    result["today_ram_bytes_per_vector"] = today["ram_bytes_per_vector"]
    result["today_recall_at_10"] = today["at_target_float16"]["recall"]
    result["today_ms_per_query"] = today["at_target_float16"]["ms"]
    result["target_recall_at_10"] = TARGET
    result["threads"] = args.threads
    result["mixture"] = mixture

    path = common.DATA / "ann" / f"{REAL}.hdf5"
    if path.exists() and not args.no_real:
        ann = load_ann(path)
        real = {
            "base": ann["train"],
            "queries": ann["test"],
            "truth": ann["neighbors"][:, :K],
            "metric": ann["metric"],
        }
        print(f"{REAL}: {ann['train'].shape[0]:,} x {ann['train'].shape[1]}-d")
        result["real"] = {
            "dataset": REAL,
            **run_dataset(real, code_variants(ann["train"].shape[1]), kinds),
        }
    common.write_and_plot("bytes_per_vector", result, plot, headline=True)


def add_policy_keys(result: dict) -> None:
    """``policy_*``: the measured row of what ``index.ann.policy`` picks for this shape (the
    fewest bytes at the target is ``chosen_*``)."""
    mixture = result["mixture"]
    spec = choose_index(mixture["n"], mixture["dim"], mixture["metric"], "64G")
    for row in mixture["variants"]:
        if row["factory"] == spec.factory and (not getattr(spec, "qb", 0) or row["qb"] == spec.qb):
            point = row["at_target_float16"]
            result.update(
                policy_codes=row["variant"],
                policy_ram_bytes_per_vector=row["ram_bytes_per_vector"],
                policy_recall_at_10=point["recall"],
                policy_ms_per_query=point["ms"],
            )


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    sets = [("mixture", result["mixture"])] + (
        [("real", result["real"])] if "real" in result else []
    )
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.8), squeeze=False)
    for ax, (name, data) in zip(axes[0], sets, strict=True):
        for row in data["variants"]:
            p = row["at_target_float16"]
            ax.scatter(row["ram_bytes_per_vector"], p["recall"], s=40)
            ax.annotate(
                f"{row['variant']}\n{p['ms']:.2f} ms, {p['candidates']} cand",
                (row["ram_bytes_per_vector"], p["recall"]),
                fontsize=6,
                xytext=(4, 2),
                textcoords="offset points",
            )
        ax.axhline(TARGET, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("RAM bytes per vector (codes + ids)")
        ax.set_ylabel("recall@10 after float16 rerank (fastest point >= target, else best)")
        ax.set_title(f"{name}: {data['n']:,} x {data['dim']}-d", fontsize=9)
        ax.grid(alpha=0.3)
    common.machine_title(fig, "bytes per vector at recall@10 >= 0.95", result)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
