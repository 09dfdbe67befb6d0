"""A store's learned transform through the whole system: Caltech-101 over HTTP (#25.5)

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/transform_http.py

``benchmarks/whitening.py`` measured PCA and whitening by exact search in-process; its results
wrote the rule ``index.ann.transform.choose_transform``. This measures what a user gets from that
rule: the Caltech-101 train photos' EfficientNet-Lite0 vectors (the default backbone, embedded
with the query path's crop, cached in ``--workdir`` as ``benchmarks/quality.py`` caches them)
written as Parquet parts into two 4-shard stores, each built by the build job
(``pipelines.build_index.run``, Ray tasks) - one with ``--transform none``, one with the default
``auto`` (which the rule turns into PCA to 128-d at this size) - and served by the real app; every
test photo's vector sent to ``POST /search`` (k=100) as JSON. Per store: precision@10 and mAP@100
with the class as relevance (``BACKGROUND_Google`` left out), HTTP p50/p99 at ``--concurrency``,
the build's wall time, and bytes per vector on disk and in RAM (FAISS codes and ids, the row
table, the float16 rerank vectors that are memory-mapped). The exact-search scores of the same
vectors in each space are recorded beside them (what the index approximates).

Writes ``results/transform_http.json`` + ``.png`` and adds ``map_plain_http``, ``map_pca_http``,
``rerank_bytes_plain``/``rerank_bytes_pca`` and ``transform_auto`` to ``results/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from benchmarks.answer_scores import exact_labels, scores_of  # noqa: E402
from pipelines.local_ray import init_local_ray, use_local_ray_env  # noqa: E402

use_local_ray_env()

NAME = "transform_http"
MODES = ("none", "auto")
SHARDS = 4


def vectors(args) -> dict:
    from benchmarks.quality import backbone_vectors
    from harness.caltech_catalogue import class_of, split

    train, test = split(args.caltech, "train.txt"), split(args.caltech, "test.txt")
    v = backbone_vectors(args, "efficientnet_lite0", train, test)
    return {
        "train": v["train"],
        "test": v["test"],
        "uris": [str(p) for p in train],
        "train_labels": [class_of(str(p)) for p in train],
        "test_labels": [class_of(str(p)) for p in test],
        "model": v["model"],
    }


def build_store(args, data: dict, mode: str) -> dict:
    """A 4-shard store of the train vectors, built by the build job with ``--transform mode``."""
    from harness.stores import write_store
    from index.rows.sharding import uri_id
    from pipelines.build_index import BuildConfig, run

    name, weights = data["model"].split("@", 1)
    root = args.workdir / f"transform-{mode}-{time.time_ns()}"
    ids = [uri_id(u) for u in data["uris"]]
    write_store(root, ids, data["uris"], data["train"], SHARDS, model=name, weights=weights)
    t = time.perf_counter()
    summary = run(BuildConfig(store=str(root), transform=mode, num_cpus=1, progress=False))
    seconds = time.perf_counter() - t
    if summary.failed or len(summary.built) != SHARDS:
        raise RuntimeError(f"build of {root}: {summary.line()}")
    print(summary.line(), flush=True)
    return {"store": str(root), "build_seconds": round(seconds, 1), "build": summary.line()}


def footprint(store_uri: str) -> dict:
    """Bytes per vector of the built versions: in RAM (codes, ids, centroids, row table) and the
    memory-mapped float16 rerank vectors, and on disk (every file of each version)."""
    from index.ann.shard_index import ShardIndex
    from index.storage.manifest import load_manifest
    from index.storage.store import Store

    store = Store(store_uri)
    manifest = load_manifest(store)
    rows, ram, rerank, disk, dims = 0, 0, 0, 0, set()
    for shard in range(manifest.num_shards):
        index = ShardIndex.load(store, shard)
        parts = index.memory_breakdown()
        rows += index.count
        rerank += parts["vectors_mmap"]
        ram += index.memory_bytes()
        disk += sum(f.stat().st_size for f in index.directory.iterdir() if f.is_file())
        dims.add(index.dim)
    return {
        "rows": rows,
        "indexed_dim": sorted(dims),
        "transform": manifest.transform,
        "ram_bytes_per_vector": round(ram / rows, 1),
        "rerank_bytes_per_vector": round(rerank / rows, 1),
        "disk_bytes_per_vector": round(disk / rows, 1),
    }


def exact_scores(data: dict, store_uri: str, relevant: dict) -> dict:
    """Exact search of the test vectors over the train vectors in the store's space."""
    from index.ann.transform import load_transform
    from index.storage.manifest import load_manifest
    from index.storage.store import Store

    store = Store(store_uri)
    transform = load_transform(store, load_manifest(store))
    queries, catalogue = data["test"], data["train"]
    if transform is not None:
        queries, catalogue = transform.apply(queries), transform.apply(catalogue)
    answers = exact_labels(queries, catalogue, data["train_labels"])
    return scores_of(answers, data["test_labels"], relevant)


def served_scores(args, data: dict, store_uri: str, relevant: dict) -> dict:
    from benchmarks.quality import BACKBONES
    from benchmarks.quality_http import app_config, http_pass
    from harness.caltech_catalogue import class_of
    from harness.serving import serving

    bodies = [{"vector": v.tolist()} for v in data["test"]]
    name = data["model"].split("@", 1)[0]  # the app asks for the weights; the store has their tag
    with serving(app_config(store_uri, (name, BACKBONES[name]))) as served:
        http_pass(served.url, bodies[:50], {"k": 100}, args.concurrency)  # warm every replica
        answers, timing = http_pass(served.url, bodies, {"k": 100}, args.concurrency)
    labels = [[class_of(r["uri"]) for r in a] for a in answers]
    return {**scores_of(labels, data["test_labels"], relevant), **timing}


def plot(result: dict, png: Path) -> None:
    plt = common.pyplot()
    runs = result["stores"]
    names = [f"{m}\n({runs[m]['footprint']['indexed_dim'][0]}-d)" for m in MODES]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    x = np.arange(len(MODES))
    for offset, key, label in (
        (-0.2, "http", "over HTTP (IVF+PQ + rerank)"),
        (0.2, "exact", "exact"),
    ):
        bars = left.bar(x + offset, [runs[m][key]["map_at_100"] for m in MODES], 0.38, label=label)
        common.label_bars(left, bars, [f"{runs[m][key]['map_at_100']:.3f}" for m in MODES])
    left.set_xticks(x, names)
    left.set_ylabel("Caltech-101 mAP@100")
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    keys = ("rerank_bytes_per_vector", "ram_bytes_per_vector")
    for offset, key in zip((-0.2, 0.2), keys, strict=True):
        values = [runs[m]["footprint"][key] for m in MODES]
        bars = right.bar(x + offset, values, 0.38, label=key.replace("_", " "))
        common.label_bars(right, bars, [f"{v:,.0f}" for v in values])
    right.set_xticks(x, names)
    right.set_ylabel("bytes per vector")
    right.legend(fontsize=8)
    common.machine_title(fig, "The store transform (--transform) through the system", result)
    common.save_figure(fig, png)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caltech", type=Path, default=common.CALTECH)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vs-bench-quality"))
    p.add_argument("--concurrency", type=int, default=4)
    args = common.parse_or_replot(p, argv, NAME, plot)
    if args is None:
        return
    started = time.perf_counter()
    data = vectors(args)
    relevant = {c: data["train_labels"].count(c) for c in set(data["train_labels"])}
    ray = init_local_ray(args.workdir / "ray", num_cpus=4)
    stores = {}
    try:
        for mode in MODES:
            print(f"--transform {mode}:", flush=True)
            built = build_store(args, data, mode)
            stores[mode] = {
                **built,
                "footprint": footprint(built["store"]),
                "exact": exact_scores(data, built["store"], relevant),
                "http": served_scores(args, data, built["store"], relevant),
            }
            print(json.dumps(stores[mode], indent=1), flush=True)
    finally:
        ray.shutdown()
    plain, auto = stores["none"], stores["auto"]
    result = {
        "map_plain_http": plain["http"]["map_at_100"],
        "map_pca_http": auto["http"]["map_at_100"],
        "precision_at_10_plain_http": plain["http"]["precision_at_10"],
        "precision_at_10_pca_http": auto["http"]["precision_at_10"],
        "rerank_bytes_plain": plain["footprint"]["rerank_bytes_per_vector"],
        "rerank_bytes_pca": auto["footprint"]["rerank_bytes_per_vector"],
        "transform_auto": auto["build"].split("transform: ")[-1],
        "catalogue": len(data["train"]),
        "queries": len(data["test"]),
        "model": data["model"],
        "stores": stores,
        "seconds": round(time.perf_counter() - started, 1),
        "command": common.command(NAME, argv),
    }
    common.write_and_plot(NAME, result, plot, headline=True)
    quality = common.RESULTS_DIR / "quality.json"
    if quality.exists():  # beside the whitening keys #25 asked for: merged, other keys kept
        merged = json.loads(quality.read_text())
        keys = ("map_plain_http", "map_pca_http", "rerank_bytes_plain", "rerank_bytes_pca")
        merged.update({k: result[k] for k in keys}, transform_auto=result["transform_auto"])
        quality.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
