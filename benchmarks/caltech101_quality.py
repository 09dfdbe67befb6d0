"""Retrieval quality on real photos, through the HTTP endpoint, against exact search.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/caltech101_quality.py

Catalogue: the Caltech-101 ``train.txt`` images (BACKGROUND_Google left out: it is not a class),
embedded by the real Ray Data job (``pipelines.embed.run_job``) into a 4-shard store and indexed
by ``index.ann.build`` (the index rules pick the factory). Queries: every ``test.txt`` image (same
exclusion), uploaded as a file to ``POST /search`` of the real Serve app, k=10.

Exact reference: the same test images embedded in-process with the query path's crop
(``serve.api.image_crop``, pinned to the batch job's by a test) and brute-force inner product
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
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, machine_info, save_figure, write_result  # noqa: E402
from pipelines.local_ray import free_port, init_local_ray, use_local_ray_env  # noqa: E402

use_local_ray_env()

K = 10
DATA = Path(os.environ.get("VISUAL_SEARCH_DATA", ROOT.parent / "shared" / "data"))
SKIP_CLASS = "BACKGROUND_Google"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caltech", type=Path, default=DATA / "images" / "caltech101")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vs-bench-caltech"))
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4, help="HTTP clients (embedder batches)")
    p.add_argument("--limit", type=int, help="use only the first N test queries (smoke runs)")
    p.add_argument("--name", default="caltech101_quality")
    return p.parse_args(argv)


def split(caltech: Path, name: str) -> list[Path]:
    lines = (caltech / name).read_text().split()
    return [caltech / "101_ObjectCategories" / x for x in lines if x.split("/")[0] != SKIP_CLASS]


def class_of(uri: str) -> str:
    return Path(uri).parent.name


# ---- catalogue: the real embedding job + index build ---------------------------------------------
def build_catalogue(args, train: list[Path]) -> dict:
    from index.live.rebuild import rebuild_shard
    from pipelines.embed import run_job
    from pipelines.embed_config import EmbedJobConfig

    store_uri = str(args.workdir / f"store-{args.shards}")
    listing = args.workdir / "train-list.txt"
    listing.write_text("".join(f"{p}\n" for p in train))
    t = time.perf_counter()
    model = {"model": args.model, "weights": args.weights} if getattr(args, "model", None) else {}
    summary = run_job(
        EmbedJobConfig(input=[str(listing)], store=store_uri, num_shards=args.shards, **model)
    )
    info = {"store": store_uri, "embed": summary.to_dict(), "embed_s": time.perf_counter() - t}
    print(summary.line())
    from index.storage.store import Store

    store = Store(store_uri)
    t = time.perf_counter()
    for shard in range(args.shards):
        r = rebuild_shard(store, shard)
        if r["built"]:
            print(f"shard {shard}: {r['count']} rows, {r['dir']}")
    info["build_s"] = time.perf_counter() - t
    return info


def catalogue_vectors(store_uri: str) -> tuple[list[str], list[str], np.ndarray]:
    from index.rows import schema
    from index.storage.manifest import load_manifest
    from index.storage.store import Store

    store = Store(store_uri)
    manifest = load_manifest(store)
    parts = [store.path(p) for s in range(manifest.num_shards) for p in store.list_parts(s)]
    table = store.read_parquet(parts, columns=[schema.ID, schema.URI, schema.EMBEDDING])
    vectors = schema.arrow_to_vectors(table[schema.EMBEDDING])
    return table[schema.ID].to_pylist(), table[schema.URI].to_pylist(), vectors


def query_vectors(args, test: list[Path]) -> np.ndarray:
    """Test images embedded in-process exactly as the query path does (cached)."""
    path = args.workdir / f"test-vectors-{len(test)}.npy"
    if path.exists():
        return np.load(path)
    from embedding import Embedder, ModelConfig
    from serve.http.crop import image_crop
    from serve.http.limits import Limits

    embedder = Embedder(ModelConfig(threads=len(os.sched_getaffinity(0))))
    t = time.perf_counter()
    out = []
    for start in range(0, len(test), 32):
        crops = [
            image_crop(p.read_bytes(), embedder.image_size, Limits())
            for p in test[start : start + 32]
        ]
        out.append(embedder.embed(np.stack(crops)))
    vectors = np.concatenate(out)
    print(f"embedded {len(test)} test images in-process in {time.perf_counter() - t:.0f} s")
    np.save(path, vectors)
    return vectors


# ---- HTTP ----------------------------------------------------------------------------------------
def http_answers(args, store_uri: str, test: list[Path]) -> tuple[list[list[str]], dict]:
    import httpx
    from ray import serve

    from serve.app import build_app
    from serve.config import ServeConfig

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(store=store_uri, reload_interval_s=0)
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    url = f"http://127.0.0.1:{port}/search"
    answers: list[list[str] | None] = [None] * len(test)
    latencies: list[float] = []
    partial = 0
    counter = iter(range(len(test)))
    lock = threading.Lock()

    def worker():
        nonlocal partial
        with httpx.Client(timeout=120) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                data = test[i].read_bytes()
                t = time.perf_counter()
                r = client.post(
                    url, params={"k": K}, files={"file": (test[i].name, data, "image/jpeg")}
                )
                dt = time.perf_counter() - t
                r.raise_for_status()
                body = r.json()
                with lock:
                    latencies.append(dt)
                    partial += bool(body["partial"])
                    answers[i] = [h["uri"] for h in body["results"]]

    try:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        stats = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=30).json()
    finally:
        serve.shutdown()
    ms = np.asarray(latencies) * 1000
    return answers, {
        "queries": len(test),
        "concurrency": args.concurrency,
        "partial_answers": partial,
        "qps": round(len(test) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "embedder": stats.get("embedder"),
        "shards": stats.get("shards"),
    }


# ---- metrics -----------------------------------------------------------------------------------
def precision(answers: list[list[str]], query_classes: list[str]) -> tuple[float, float, dict]:
    per_query = [
        sum(class_of(u) == c for u in a[:K]) / K
        for a, c in zip(answers, query_classes, strict=True)
    ]
    by_class: dict[str, list[float]] = defaultdict(list)
    for p, c in zip(per_query, query_classes, strict=True):
        by_class[c].append(p)
    per_class = {c: float(np.mean(v)) for c, v in sorted(by_class.items())}
    return float(np.mean(per_query)), float(np.mean(list(per_class.values()))), per_class


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TMPDIR", str(args.workdir))
    train, test = split(args.caltech, "train.txt"), split(args.caltech, "test.txt")
    if args.limit:
        test = test[: args.limit]
    import ray

    init_local_ray(args.workdir / "ray", num_cpus=4)
    try:
        catalogue = build_catalogue(args, train)
        ids, uris, vectors = catalogue_vectors(catalogue["store"])
        queries = query_vectors(args, test)
        # exact: brute force over the same catalogue vectors the indexes were built from
        scores = queries @ vectors.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        exact = [[uris[j] for j in row] for row in top]
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
        "machine": machine_info(),
        "command": "flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/caltech101_quality.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    path = write_result(args.name, result)
    plot(result, RESULTS_DIR / f"{args.name}.png")
    print(f"\n{len(test)} test queries vs {len(uris)} catalogue images, {args.shards} shards")
    print(
        f"precision@10  HTTP {p_http:.4f}   exact {p_exact:.4f}   (gap {abs(p_http - p_exact):.4f})"
    )
    print(f"recall@10 of HTTP vs exact: {recall:.4f}")
    print(
        f"HTTP image queries: {http['qps']} q/s at concurrency {args.concurrency}, "
        f"p50 {http['p50_ms']} ms, {http['partial_answers']} partial"
    )
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
