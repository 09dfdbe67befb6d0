"""The systems ``benchmarks/peers.py`` compares, built once (cached under ``--workdir``) and
searched one query at a time: ``search(q, knob_a, knob_b) -> ids``.

- ours: the store of ``--shards`` shards (``harness.synthetic.cached_store``), searched
  in-process by scatter and exact merge (``index.live.recall.search_all``);
- one FAISS index over all N with the factory our policy picks for N
  (``index.ann.policy.choose_index``, built by ``index.ann.build.build_arrays``);
- LanceDB IVF_PQ, embedded (``harness.lance_table``);
- Milvus Lite (``harness.milvus_lite``: its gRPC server + ``pymilvus``): HNSW and IVF_SQ8,
  ``--milvus-n`` rows of the N when given.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from harness import lance_table, milvus_lite
from harness.synthetic import cached_store

K = 10


def build_path(args) -> Path:
    return args.workdir / f"peers-build-{args.n}-{args.dim}-{args.shards}.json"


def single_dir(args) -> Path:
    return args.workdir / f"single-{args.n}-{args.dim}"


def lance_dir(args) -> Path:
    return args.workdir / f"lance-{args.n}-{args.dim}-{lance_table.METRIC}"


def build_single(args, base: np.ndarray, ids: list[str], uris: list[str]) -> dict:
    """One FAISS index over all N with the factory our rules pick for N (cached)."""
    from index.ann.build import build_arrays
    from index.ann.policy import choose_index

    out = single_dir(args)
    if (out / "meta.json").exists():
        return json.loads((out / "meta.json").read_text())
    spec = choose_index(args.n, args.dim, "ip", args.memory_budget)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.perf_counter()
    meta = build_arrays(base, ids, uris, tmp, spec, "ip", memory_budget=args.memory_budget)
    meta["wall_seconds"] = round(time.perf_counter() - t, 2)
    (tmp / "meta.json").write_text(json.dumps(meta))
    tmp.rename(out)
    print(f"FAISS single index {spec.factory}: {meta['wall_seconds']} s", flush=True)
    return meta


def milvus_rows(args) -> int:
    return min(args.n, args.milvus_n) if args.milvus_n else args.n


def build_all(args, base, ids, uris) -> dict:
    """Build (or reuse) every system; build timings are kept next to them."""
    import faiss

    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))  # builds use every core
    path = build_path(args)
    saved = json.loads(path.read_text()) if path.exists() else {}
    ours = cached_store(args.workdir, base, ids, uris, args.shards, args.memory_budget)
    if not ours.get("reused"):
        saved["ours"] = ours
    saved.setdefault("ours", ours)
    single = build_single(args, base, ids, uris)
    saved["faiss_single"] = {
        "factory": single["factory"],
        "nlist": single.get("nlist"),
        "build_seconds": single.get("build_seconds"),
        "wall_seconds": single.get("wall_seconds"),
        "tuned_nprobe": single.get("nprobe"),
        "tuned_candidates": single.get("candidates"),
    }
    saved["lancedb"] = lance_table.build(lance_dir(args), base)
    if not args.skip_milvus:
        server = milvus_lite.MilvusLite(args.workdir / "milvus-lite")
        try:
            saved["milvus_lite"] = milvus_lite.build(server.client, base, milvus_rows(args))
        finally:
            server.close()
    path.write_text(json.dumps(saved))
    return saved


def shard_searcher(shards):
    """``search(q, nprobe, candidates) -> ids``: scatter over ``shards`` in-process and merge."""
    from index.live.recall import search_all

    def search(q, nprobe, candidates):
        return search_all(shards, q[None, :], K, nprobe=nprobe, candidates=candidates)[0]

    return search


def in_process_searchers(args, store_uri: str, ids: list[str]) -> dict:
    """Ours in-process, the single FAISS index and LanceDB: name -> search."""
    from index.ann.shard_index import ShardIndex
    from index.storage.store import Store

    store = Store(store_uri)
    shards = [ShardIndex.load(store, s) for s in range(args.shards)]
    return {
        "ours_inprocess": shard_searcher(shards),
        "faiss_inprocess": shard_searcher([ShardIndex.open_dir(single_dir(args))]),
        "lancedb": lance_table.searcher(lance_dir(args), ids, K),
    }
