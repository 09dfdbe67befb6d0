"""Recall of sharded IVF+PQ (+ rerank) on real vectors with exact ground truth.

Builds a store from each ann-benchmarks file in ``../shared/data/ann`` (caltech101-mnv2-1280:
real MobileNetV2 embeddings of Caltech-101 photos, 4 shards; sift5k-128: real SIFT, 2 shards) with
the index policy's defaults, then runs the recall tool (``python -m index.live.recall``) on it:

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/index_recall_ann.py

Writes benchmarks/results/index_recall_<dataset>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks.common import DATA, RESULTS_DIR, machine_info  # noqa: E402
from harness.stores import load_ann, write_store  # noqa: E402
from index.live import recall  # noqa: E402
from index.live.rebuild import rebuild_shard  # noqa: E402

DATASETS = {"caltech101-mnv2-1280-angular": 4, "sift5k-128-euclidean": 2}


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for name, num_shards in DATASETS.items():
        path = DATA / "ann" / f"{name}.hdf5"
        ann = load_ann(path)  # angular: L2-normalised, searched by inner product
        ids = [str(i) for i in range(len(ann["train"]))]
        uris = [f"gen://{i}" for i in ids]
        with tempfile.TemporaryDirectory(prefix="vs-recall-") as tmp:
            vectors, metric = ann["train"], ann["metric"]
            store = write_store(tmp, ids, uris, vectors, num_shards, metric, model="generated")
            t = time.perf_counter()
            for s in range(num_shards):
                rebuild_shard(store, s)
            build_s = time.perf_counter() - t
            out = RESULTS_DIR / f"index_recall_{name.split('-')[0]}"
            result = recall.main(
                ["--store", str(store.root), "--queries", str(path), "--out", str(out)]
            )
        result.update(build_seconds=round(build_s, 2), machine=machine_info(), store=None)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
