"""Retrieval quality on real photos, through the HTTP endpoint, against exact search.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/caltech101_quality.py

Catalogue: the Caltech-101 ``train.txt`` images (BACKGROUND_Google left out: it is not a class),
embedded by the real Ray Data job (``pipelines.embed.run_job``) into a 4-shard store and indexed
by ``index.ann.build`` (the index rules pick the factory; ``harness/caltech_catalogue.py``).
Queries: every ``test.txt`` image (same exclusion), uploaded as a file to ``POST /search`` of the
real Serve app, k=10.

Exact reference: the same test images embedded in-process with the query path's crop
(``serve.http.crop.image_crop``, pinned to the batch job's by a test) and brute-force inner product
against every catalogue vector read back from the store's Parquet. Reported:

- precision@10 by class (a result is relevant when its class is the query's), HTTP and exact,
  averaged over queries (and per class, macro-averaged);
- recall@10 of the HTTP answers against the exact top-10.

The store and the exact query vectors are cached under ``--workdir`` and reused.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from benchmarks.answer_scores import K, exact_labels, precision_at  # noqa: E402
from harness.caltech_catalogue import build_catalogue, catalogue_vectors, class_of, split  # noqa: E402
from harness.closed_loop import post_searches  # noqa: E402
from harness.serve_store import embed_files  # noqa: E402
from harness.serving import serving  # noqa: E402
from pipelines.local_ray import init_local_ray, use_local_ray_env  # noqa: E402

use_local_ray_env()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caltech", type=Path, default=common.CALTECH)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vs-bench-caltech"))
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4, help="HTTP clients (embedder batches)")
    p.add_argument("--limit", type=int, help="use only the first N test queries (smoke runs)")
    p.add_argument("--name", default="caltech101_quality")
    return p.parse_args(argv)


def query_vectors(args, test: list[Path]) -> np.ndarray:
    """Test images embedded in-process exactly as the query path does (cached)."""
    path = args.workdir / f"test-vectors-{len(test)}.npy"
    if not path.exists():
        from embedding import Embedder, ModelConfig

        embedder = Embedder(ModelConfig(threads=len(os.sched_getaffinity(0))))
        np.save(path, embed_files(test, embedder)[0])
    return np.load(path)


# ---- HTTP ----------------------------------------------------------------------------------------
def http_answers(args, store_uri: str, test: list[Path]) -> tuple[list[list[str]], dict]:
    """Every test photo uploaded to ``POST /search`` from ``--concurrency`` clients."""
    import httpx

    from serve.config import ServeConfig

    uploads = [{"files": {"file": (p.name, p.read_bytes(), "image/jpeg")}} for p in test]
    with serving(ServeConfig(store=store_uri, reload_interval_s=0)) as served:
        answers, timing = post_searches(served.url, uploads, {"k": K}, args.concurrency)
        stats = httpx.get(f"{served.url}/stats", timeout=30).json()
    return [[h["uri"] for h in a["results"]] for a in answers], {
        "queries": len(test),
        "concurrency": args.concurrency,
        "partial_answers": sum(a["partial"] for a in answers),
        "qps": round(timing["qps"], 2),
        "p50_ms": round(timing["p50_ms"], 1),
        "p99_ms": round(timing["p99_ms"], 1),
        "embedder": stats.get("embedder"),
        "shards": stats.get("shards"),
    }


# ---- metrics -----------------------------------------------------------------------------------
def precision(answers: list[list[str]], query_classes: list[str]) -> tuple[float, float, dict]:
    pairs = zip(answers, query_classes, strict=True)
    per_query = [precision_at([class_of(u) for u in a], c) for a, c in pairs]
    by_class: dict[str, list[float]] = defaultdict(list)
    for p, c in zip(per_query, query_classes, strict=True):
        by_class[c].append(p)
    per_class = {c: float(np.mean(v)) for c, v in sorted(by_class.items())}
    return float(np.mean(per_query)), float(np.mean(list(per_class.values()))), per_class


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    exact = result["per_class_exact"]
    http = result["per_class_http"]
    classes = sorted(exact, key=lambda c: exact[c])
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([exact[c] for c in classes], [http[c] for c in classes], "o", ms=4, alpha=0.7)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("precision@10, exact brute-force search")
    ax.set_ylabel("precision@10, HTTP (IVF-PQ shards + rerank)")
    ax.set_title(
        f"Caltech-101, {result['queries']} test queries vs {result['catalogue']} train images, "
        f"{result['shards']} shards\nP@10 HTTP {result['precision_at_10_http']:.3f}, exact "
        f"{result['precision_at_10_exact']:.3f}; recall@10 vs exact "
        f"{result['recall_at_10_vs_exact']:.3f}",
        fontsize=9,
    )
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.work_in(args.workdir)
    train, test = split(args.caltech, "train.txt"), split(args.caltech, "test.txt")
    if args.limit:
        test = test[: args.limit]
    ray = init_local_ray(args.workdir / "ray", num_cpus=4)
    try:
        catalogue = build_catalogue(args.workdir, args.shards, train)
        ids, uris, vectors = catalogue_vectors(catalogue["store"])
        queries = query_vectors(args, test)
        # exact: brute force over the same catalogue vectors the indexes were built from
        exact = exact_labels(queries, vectors, uris, K)
        answers, http = http_answers(args, catalogue["store"], test)
    finally:
        ray.shutdown()
    query_classes = [class_of(str(p)) for p in test]
    p_http, p_http_macro, per_class_http = precision(answers, query_classes)
    p_exact, p_exact_macro, per_class_exact = precision(exact, query_classes)
    recall = float(
        np.mean([len(set(a[:K]) & set(e)) / K for a, e in zip(answers, exact, strict=True)])
    )
    result = {
        "precision_at_10_http": round(p_http, 4),
        "precision_at_10_exact": round(p_exact, 4),
        "recall_at_10_vs_exact": round(recall, 4),
        "precision_gap": round(abs(p_http - p_exact), 4),
        "precision_at_10_http_macro": round(p_http_macro, 4),
        "precision_at_10_exact_macro": round(p_exact_macro, 4),
        "queries": len(test),
        "catalogue": len(uris),
        "classes": len(per_class_exact),
        "shards": args.shards,
        "k": K,
        "model": "efficientnet_lite0 (ImageNet), 1280-d",
        "http": http,
        "catalogue_build": catalogue,
        "per_class_http": per_class_http,
        "per_class_exact": per_class_exact,
        "machine": common.machine_info(),
        "command": common.command("caltech101_quality", argv),
    }
    common.write_and_plot(args.name, result, plot, headline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
