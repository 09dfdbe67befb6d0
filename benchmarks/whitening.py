"""Learned whitening: PCA-whitening learned on the catalogue, applied to queries (#25.5)

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/whitening.py

PCA-whitening (Jégou and Chum, "Negative evidence and co-occurrences in image retrieval", 2012; the
standard post-processing of CNN descriptors for *instance* retrieval) is learned on the catalogue's
own vectors, as a store's first build learns it (``index.ann.transform``, the same code; its rule
``choose_transform`` is written from this benchmark's results): centre on the catalogue mean,
project on the top ``d`` principal directions, scale each by ``eigenvalue ** power`` (``-0.5``:
full whitening, ``-0.25``: half, ``0``: PCA reduction only), L2-normalise; queries get the same
transform. Measured by exact search on Caltech-101 (queries: test photos, catalogue: train photos,
the class as relevance; precision@10 and mAP@100 as ``benchmarks/quality.py``), for the default
backbone (EfficientNet-Lite0, embedded here with the query path's crop; the vectors are cached in
``--workdir``) and for the MobileNetV2 vectors of ``../shared/data/ann``.

The written rules (``choose``): whitening is on only when a whitened setting beats the plain
vectors, and PCA reduction alone at the same ``d``, by ``WHITEN_MARGIN`` mAP@100; PCA reduction
is on when its best ``d`` beats plain by as much; the smallest ``d`` within ``PCA_LOSS`` of
plain is reported too (the float16 rerank bytes it would save per vector). Adds
``map_whitened`` (the best whitened setting of the default backbone), ``map_plain_exact`` (the
same run's plain vectors), ``map_pca``/``pca_dim``/``pca_on`` and ``whitening`` (the rules and
their inputs) to
``benchmarks/results/quality.json``, keeping its other keys; the full table is
``results/whitening.json`` + ``.png``.
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
from index.ann.transform import TransformSpec, learn_transform  # noqa: E402

NAME = "whitening"
DIMS = (None, 512, 256, 128, 64)  # None: every dimension
POWERS = (0.0, -0.25, -0.5)
WHITEN_MARGIN = 0.01  # mAP@100 a whitened setting must gain to be switched on
PCA_LOSS = 0.005  # mAP@100 a PCA reduction may cost to count as "the same"


def evaluate(train, test, train_labels, test_labels) -> dict:
    relevant = {c: train_labels.count(c) for c in set(train_labels)}
    plain = scores_of(exact_labels(test, train, train_labels), test_labels, relevant)
    rows = []
    for dim in DIMS:
        for power in POWERS:
            d = dim or train.shape[1]
            transform = learn_transform(train, TransformSpec(d, power), "ip")
            answers = exact_labels(transform.apply(test), transform.apply(train), train_labels)
            rows.append(
                {
                    "dim": d,
                    "power": power,
                    **scores_of(answers, test_labels, relevant),
                    "rerank_bytes_float16": 2 * d,
                }
            )
            print(f"  d={d} power={power}: {rows[-1]}", flush=True)
    return {
        "plain": {**plain, "dim": train.shape[1], "rerank_bytes_float16": 2 * train.shape[1]},
        "settings": rows,
        "catalogue": len(train),
        "queries": len(test),
    }


def choose(table: dict) -> dict:
    """The written rules over one backbone's table (see the module docstring): whitening is on
    when its best setting beats both the plain vectors and PCA reduction alone at the same
    ``d`` by ``WHITEN_MARGIN`` (else what helped was the reduction, not the whitening); the
    reduction is on when its best ``d`` gains ``WHITEN_MARGIN`` over plain."""
    plain = table["plain"]["map_at_100"]
    pca = {r["dim"]: r for r in table["settings"] if r["power"] == 0}
    whitened = [r for r in table["settings"] if r["power"] < 0]
    best = max(whitened, key=lambda r: (r["map_at_100"], -r["dim"]))
    best_pca = max(pca.values(), key=lambda r: (r["map_at_100"], -r["dim"]))
    same = [r for r in pca.values() if r["map_at_100"] >= plain - PCA_LOSS]
    smallest = min(same, key=lambda r: r["dim"]) if same else None
    floor = max(plain, pca[best["dim"]]["map_at_100"])
    return {
        "on": best["map_at_100"] >= floor + WHITEN_MARGIN,
        "best_whitened": best,
        "reduce": best_pca["map_at_100"] >= plain + WHITEN_MARGIN,
        "best_pca": best_pca,
        "pca_same_map": smallest,
        "rule": (
            f"whiten only when a whitened setting gains >= {WHITEN_MARGIN:g} mAP@100 over the "
            "plain vectors and over PCA reduction alone at its d; reduce (PCA) when the best d "
            f"gains >= {WHITEN_MARGIN:g}"
        ),
    }


def lite0_vectors(args) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    from benchmarks.quality import backbone_vectors
    from harness.caltech_catalogue import class_of, split

    train, test = split(args.caltech, "train.txt"), split(args.caltech, "test.txt")
    v = backbone_vectors(args, "efficientnet_lite0", train, test)
    return (
        v["train"],
        v["test"],
        [class_of(str(p)) for p in train],
        [class_of(str(p)) for p in test],
    )


def mnv2_vectors(path: Path):
    import h5py

    with h5py.File(path) as f:
        train, test = f["train"][:], f["test"][:]
        labels = [x.decode() if isinstance(x, bytes) else str(x) for x in f["train_labels"][:]]
        queries = [x.decode() if isinstance(x, bytes) else str(x) for x in f["test_labels"][:]]
    norm = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(train), norm(test), labels, queries


def plot(result: dict, png: Path) -> None:
    plt = common.pyplot()
    backbones = result["backbones"]
    fig, axes = plt.subplots(1, len(backbones), figsize=(5.5 * len(backbones), 4.2), squeeze=False)
    for ax, (name, table) in zip(axes[0], backbones.items(), strict=True):
        for power, style in zip(POWERS, ("-o", "--s", ":^"), strict=True):
            rows = sorted(
                (r for r in table["settings"] if r["power"] == power), key=lambda r: r["dim"]
            )
            label = {0.0: "PCA only", -0.25: "half whitening", -0.5: "whitening"}[power]
            ax.plot([r["dim"] for r in rows], [r["map_at_100"] for r in rows], style, label=label)
        ax.axhline(
            table["plain"]["map_at_100"],
            color="grey",
            lw=1,
            ls="--",
            label=f"plain {table['plain']['dim']}-d",
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dimensions kept (float16 rerank bytes = 2 x d)")
        ax.set_ylabel("Caltech-101 mAP@100 (exact search)")
        ax.set_title(f"{name}: learned on the catalogue ({table['catalogue']} photos)", fontsize=9)
        ax.legend(fontsize=8)
    common.machine_title(fig, "PCA-whitening learned per store", result)
    common.save_figure(fig, png)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caltech", type=Path, default=common.CALTECH)
    p.add_argument(
        "--ann", type=Path, default=common.DATA / "ann" / "caltech101-mnv2-1280-angular.hdf5"
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vs-bench-quality"))
    args = common.parse_or_replot(p, argv, NAME, plot)
    if args is None:
        return
    started = time.perf_counter()
    backbones = {}
    print("efficientnet_lite0 (the default backbone):", flush=True)
    backbones["efficientnet_lite0"] = evaluate(*lite0_vectors(args))
    print("mobilenet_v2 (../shared/data/ann):", flush=True)
    backbones["mobilenet_v2"] = evaluate(*mnv2_vectors(args.ann))
    rules = {name: choose(table) for name, table in backbones.items()}
    lite0, rule = backbones["efficientnet_lite0"], rules["efficientnet_lite0"]
    result = {
        "map_whitened": rule["best_whitened"]["map_at_100"],
        "precision_at_10_whitened": rule["best_whitened"]["precision_at_10"],
        "map_plain_exact": lite0["plain"]["map_at_100"],
        "precision_at_10_plain_exact": lite0["plain"]["precision_at_10"],
        "whitening_on": rule["on"],
        "map_pca": rule["best_pca"]["map_at_100"],
        "pca_dim": rule["best_pca"]["dim"],
        "pca_on": rule["reduce"],
        "rules": rules,
        "backbones": backbones,
        "seconds": round(time.perf_counter() - started, 1),
        "command": common.command(NAME, argv),
    }
    common.write_and_plot(NAME, result, plot, headline=True)
    quality = common.RESULTS_DIR / "quality.json"
    if quality.exists():  # the key lives in quality.json: merged, other keys kept
        merged = json.loads(quality.read_text())
        keys = ("map_whitened", "map_plain_exact", "whitening_on", "map_pca", "pca_dim", "pca_on")
        merged.update({k: result[k] for k in keys})
        merged["whitening"] = {
            "rule": rule,
            "source": "benchmarks/results/whitening.json",
            "command": result["command"],
        }
        quality.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"updated {quality}")


if __name__ == "__main__":
    main()
