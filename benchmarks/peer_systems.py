"""The systems ``benchmarks/peers.py`` compares, built once (cached under ``--workdir``) and
searched one query at a time: ``search(q, knob_a, knob_b) -> ids``.

- ours: the store of ``--shards`` shards (``harness.synthetic.cached_store``), searched
  in-process by scatter and exact merge (``index.live.recall.search_all``);
- one FAISS index over all N with the factory our policy picks for N
  (``index.ann.policy.choose_index``, built by ``index.ann.build.build_arrays``);
- LanceDB IVF_PQ, embedded (``harness.lance_table``);
- Milvus Lite (``milvus-lite`` gRPC server + ``pymilvus``): HNSW (M=16, efConstruction=200)
  and IVF_SQ8 (~sqrt(N) lists), inserted in batches of ``MILVUS_BATCH`` rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness import lance_table
from harness.synthetic import cached_store
from pipelines.local_ray import free_port

K = 10
MILVUS_BATCH = 10_000


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


class MilvusLite:
    """``milvus-lite server`` on a free loopback port (data kept under ``--workdir``)."""

    def __init__(self, args):
        self.port = free_port()
        self.dir = args.workdir / "milvus-lite"
        exe = Path(sys.executable).with_name("milvus-lite")
        self.proc = subprocess.Popen(
            [str(exe), "server", "--data-dir", str(self.dir), "--host", "127.0.0.1"]
            + ["--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        from pymilvus import MilvusClient

        deadline = time.monotonic() + 120
        while True:
            try:
                self.client = MilvusClient(uri=f"http://127.0.0.1:{self.port}")
                self.client.list_collections()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.5)  # pacing the start-up poll

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def milvus_rows(args) -> int:
    return min(args.n, args.milvus_n) if args.milvus_n else args.n


def build_milvus(args, base: np.ndarray, server: MilvusLite) -> dict:
    """One collection per index type, inserted and indexed (reused when complete)."""
    from pymilvus import DataType, MilvusClient

    client, n = server.client, milvus_rows(args)
    info = {}
    for itype, params in (
        ("HNSW", {"M": 16, "efConstruction": 200}),
        ("IVF_SQ8", {"nlist": lance_table.partitions(n)}),
    ):
        name = f"vs_{itype.lower()}_{n}_{args.dim}"
        if client.has_collection(name):
            stats = client.get_collection_stats(name)
            if int(stats.get("row_count", 0)) == n:
                client.load_collection(name)
                info[itype] = {"collection": name, "reused": True, "params": params}
                continue
            client.drop_collection(name)
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=args.dim)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type=itype, metric_type="IP", params=params)
        client.create_collection(name, schema=schema, index_params=index)
        t = time.perf_counter()
        for start in range(0, n, MILVUS_BATCH):
            rows = range(start, min(n, start + MILVUS_BATCH))
            client.insert(name, [{"row": r, "vector": base[r]} for r in rows])
        insert_s = time.perf_counter() - t
        t = time.perf_counter()
        client.flush(name)
        client.load_collection(name)
        info[itype] = {
            "collection": name,
            "params": params,
            "insert_seconds": round(insert_s, 1),
            "flush_load_seconds": round(time.perf_counter() - t, 1),
        }
        print(f"Milvus Lite {itype} {params}: {info[itype]}", flush=True)
    return {"rows": n, "by_index": info}


def milvus_searcher(client, collection: str, knob: str, ids: list[str]):
    def search(q, value, _unused):
        found = client.search(
            collection,
            data=[q.tolist()],
            limit=K,
            output_fields=["row"],
            search_params={"metric_type": "IP", "params": {knob: value}},
        )
        return [ids[int(hit.id)] for hit in found[0]]

    return search


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
        server = MilvusLite(args)
        try:
            saved["milvus_lite"] = build_milvus(args, base, server)
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
