"""Which PQ flavour the policy should pick: 4-bit fast-scan vs 8-bit PQ at equal code size, with
and without an OPQ rotation, measured on the Gaussian mixture and on real CNN embeddings.

For each variant: build seconds, search milliseconds per query (batch of queries, 2 threads) and
recall@10 against exact search, without and with exact rerank of the top 100, over nprobe.
The finding is written into ``index/ann/policy.py``'s rule table.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/pq_choice.py [--n 200000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness.synthetic import exact_topk, gaussian_mixture  # noqa: E402
from index.ann.build import build_arrays  # noqa: E402
from index.ann.policy import IndexSpec  # noqa: E402
from index.ann.shard_index import ShardIndex  # noqa: E402
from index.live.recall import recall_at_k  # noqa: E402

NPROBES = [4, 8, 16, 32, 64]


def recall(found: list[list], truth: np.ndarray, k: int = 10) -> float:
    """recall@k of the hits found (their ids are row numbers) against the exact top-k rows."""
    return recall_at_k([[h.id for h in f] for f in found], [[str(r) for r in t] for t in truth], k)


def run_variant(name, factory, nlist, base, queries, truth, metric, workdir) -> dict:
    n = len(base)
    ids = [str(i) for i in range(n)]
    spec = IndexSpec("ivfpq", factory, nlist, 0, 0, min(n, 64 * nlist), 8, [])
    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp(dir=workdir))
    build_arrays(base, ids, ids, out, spec, metric, tune=False)  # fixed 100 candidates here
    build_s = time.perf_counter() - t0
    shard = ShardIndex.open_dir(out, verify=False)
    mem = shard.memory_breakdown()
    row = {
        "variant": name,
        "factory": factory,
        "build_seconds": round(build_s, 2),
        "bytes_per_vector": round((mem["codes"] + mem["ids"]) / n, 2),
        "curve": [],
    }
    for nprobe in NPROBES:
        point = {"nprobe": nprobe}
        for label, rerank in (("no_rerank", False), ("rerank", True)):
            shard.search(queries[:10], 10, nprobe=nprobe, rerank=rerank)  # warm
            t = time.perf_counter()
            found = shard.search(queries, 10, nprobe=nprobe, rerank=rerank, candidates=100)
            ms = (time.perf_counter() - t) * 1000 / len(queries)
            point[f"recall_{label}"] = round(recall(found, truth), 4)
            point[f"ms_per_query_{label}"] = round(ms, 4)
        row["curve"].append(point)
        print(
            f"{name:28s} nprobe {nprobe:3d}  recall {point['recall_no_rerank']:.3f} -> "
            f"{point['recall_rerank']:.3f}  {point['ms_per_query_no_rerank']:.3f} / "
            f"{point['ms_per_query_rerank']:.3f} ms/q",
            flush=True,
        )
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)

    data = gaussian_mixture(args.n + args.queries, args.dim, seed=1)
    base, queries = data[: args.n], data[args.n :]
    truth = exact_topk(base, queries, 10, "ip")
    nlist = 1 << int(np.ceil(np.log2(4 * np.sqrt(args.n))))
    code = args.dim // 8  # 32 bytes at 256-d
    variants = [
        (f"PQ{code}x8 ({code} B)", f"IVF{nlist},PQ{code}"),
        (f"PQ{2 * code}x4fs ({code} B)", f"IVF{nlist},PQ{2 * code}x4fs"),
        (f"PQ{2 * code}x4fsr ({code} B)", f"IVF{nlist},PQ{2 * code}x4fsr"),
        (f"OPQ+PQ{2 * code}x4fsr ({code} B)", f"OPQ{2 * code},IVF{nlist},PQ{2 * code}x4fsr"),
        (f"PQ{2 * code}x8 ({2 * code} B)", f"IVF{nlist},PQ{2 * code}"),
        (f"PQ{4 * code}x4fsr ({2 * code} B)", f"IVF{nlist},PQ{4 * code}x4fsr"),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs-pq-") as workdir:
        for name, factory in variants:
            rows.append(run_variant(name, factory, nlist, base, queries, truth, "ip", workdir))
    result = {"n": args.n, "dim": args.dim, "queries": args.queries, "nlist": nlist}
    result["threads"] = args.threads
    result["variants"] = rows
    common.write_and_plot("pq_choice", result, plot)


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in result["variants"]:
        curve = row["curve"]
        for ax, label, style in ((axes[0], "no_rerank", "--"), (axes[1], "rerank", "-")):
            ax.plot(
                [p[f"ms_per_query_{label}"] for p in curve],
                [p[f"recall_{label}"] for p in curve],
                style,
                marker="o",
                label=row["variant"],
            )
    for ax, title in zip(axes, ("IVF+PQ alone", "IVF+PQ + exact rerank of top 100"), strict=True):
        ax.set_xlabel("ms per query (batch, 2 threads)")
        ax.set_ylabel("recall@10")
        ax.set_title(f"{title}: {result['n']:,} x {result['dim']}-d Gaussian mixture")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
