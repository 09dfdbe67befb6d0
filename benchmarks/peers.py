"""Peers on the same vectors and queries, in the same run, at equal recall@10.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/peers.py [--quick | --n N]
    (needs the benchmark extra: pip install -e '.[bench]' for lancedb)

Five systems answer the same held-out queries over the same ``gaussian_mixture`` vectors
(256-d, L2-normalised, inner product):

- ours: the real Serve app over HTTP (``throughput`` mode, direct ingress port) on a store of
  ``--shards`` (4) shards built by ``index.live.rebuild.rebuild_shard`` (the store and the HTTP
  worker
  are ``benchmarks/query_latency.py``'s), each shard reranking its candidates with its float16
  vectors;
- FAISS in-process: ONE index over all N vectors, the single-index architecture of
  clip-retrieval/autofaiss, built with the factory string our policy picks for N
  (``index.ann.policy.choose_index``) by the same ``index.ann.build.build_arrays`` and searched
  with the
  same float16 rerank (``ShardIndex``): the same algorithm, no scatter-gather, no HTTP;
- the floor of a Python HTTP service (``benchmarks/floor_server.py``): one uvicorn process, no
  Ray, serving the same shards with the same search, rerank and merge code over the same
  ``/search`` contract, measured at ours' knobs (so at the same recall);
- Milvus Lite (``milvus-lite`` gRPC server + ``pymilvus``), HNSW (M=16, efConstruction=200, ef
  swept) and IVF_SQ8 (~sqrt(N) lists, nprobe swept), as users meet it: its defaults otherwise,
  inserts in batches of ``MILVUS_BATCH`` rows; ``--milvus-n`` can cap the rows it gets when a
  full build takes too long on this box (said in the JSON);
- LanceDB (embedded) IVF_PQ with the same code size (64 sub-vectors x 8 bits = 64 B/vector at
  256-d, as ours: 128 x 4 bits) and ~sqrt(N) partitions (LanceDB's documented default), metric
  L2 (same order as inner product on unit vectors; its "dot" index ranked worse, see
  ``LANCE_METRIC``), its ``refine_factor`` rescoring candidates with the stored float32 vectors.

Each system's knobs (nprobe x rerank candidates / refine factor) are swept on ``--tune-queries``
single-query searches; the cheapest point (lowest p50) reaching ``--target-recall`` is the
equal-recall operating point, measured again on every query: p50/p99 at concurrency 1 and QPS at
concurrency 16 (client threads in this process; the load generator shares the 2 cores with the
server). Ground truth: exact float32 search (``IndexFlatIP``) of all N vectors, computed once.

``--phase build`` builds (and caches under ``--workdir``) the three indexes; ``--phase measure``
measures them; the default does both. Writes benchmarks/results/peers.json (headline keys at top
level) and peers.png (recall@10 vs p99 latency, and QPS at the operating point).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import query_latency as ql  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    add_scale_args,
    machine_info,
    pareto,
    save_figure,
    write_result,
)

K = ql.K
OURS_GRID = {"nprobe": (4, 8, 16, 32, 64), "candidates": (20, 30, 50, 100, 200, 400)}  # per shard
SINGLE_GRID = {"nprobe": (8, 16, 32, 64, 128), "candidates": (50, 75, 100, 200, 400, 800)}
LANCE_GRID = {"nprobe": (4, 8, 16, 32, 64), "refine_factor": (0, 3, 5, 8, 10, 20)}
MILVUS_GRIDS = {
    "HNSW": {"ef": (16, 32, 64, 128, 256), "unused": (0,)},
    "IVF_SQ8": {"nprobe": (8, 16, 32, 64, 128), "unused": (0,)},
}
MILVUS_BATCH = 10_000
# LanceDB's IVF_PQ with distance "dot" ranked poorly here (recall@10 0.24 without refine, 0.76
# with refine_factor 5, 100k vectors) against 0.46 / 0.94 with "l2"; for L2-normalised vectors
# L2 and inner product give the same order, so LanceDB gets its better metric
LANCE_METRIC = "l2"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scale_args(
        p,
        workdir=Path("/tmp/vs-bench-scale"),
        queries=1000,
        queries_help="held-out queries (ground truth)",
    )
    p.add_argument("--tune-queries", type=int, default=200, help="single queries per grid point")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--phase", choices=("build", "measure", "all"), default="all")
    p.add_argument("--milvus-n", type=int, default=0, help="rows Milvus Lite gets (0: all N)")
    p.add_argument("--skip-milvus", action="store_true")
    p.add_argument("--name", default="peers")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.requests, args.tune_queries = min(args.n, 100_000), 300, 100
    # what query_latency's store / ground truth / HTTP worker read from args
    args.candidates, args.modes, args.entries = 400, ["throughput"], ["direct_ingress"]
    return args


# ---- the three indexes ---------------------------------------------------------------------------
def build_single(args, base: np.ndarray, ids: list[str], uris: list[str]) -> dict:
    """One FAISS index over all N with the factory our rules pick for N (cached)."""
    from index.ann.build import build_arrays
    from index.ann.policy import choose_index

    out = args.workdir / f"single-{args.n}-{args.dim}"
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


def lance_partitions(n: int) -> int:
    """~sqrt(n), LanceDB's documented default, as a power of two."""
    return 2 ** round(math.log2(max(1, math.sqrt(n))))


def lance_dir(args) -> Path:
    return args.workdir / f"lance-{args.n}-{args.dim}-{LANCE_METRIC}"


def build_lance(args, base: np.ndarray) -> dict:
    """A LanceDB table (row number, vector) with an IVF_PQ index (cached)."""
    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfPq

    path = lance_dir(args)
    info_path = path / "bench-build.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    shutil.rmtree(path, ignore_errors=True)
    db = lancedb.connect(str(path))
    t = time.perf_counter()
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(base.reshape(-1)), args.dim)
    table = pa.table({"row": pa.array(np.arange(len(base), dtype=np.int64)), "vector": vectors})
    tbl = db.create_table("vectors", data=table, mode="overwrite")
    write_s = time.perf_counter() - t
    params = {
        "distance_type": LANCE_METRIC,
        "num_partitions": lance_partitions(args.n),
        "num_sub_vectors": args.dim // 4,  # 8-bit codes: dim/4 bytes per vector, as ours
        "num_bits": 8,
    }
    t = time.perf_counter()
    tbl.create_index("vector", config=IvfPq(**params))
    info = {
        "params": params,
        "write_seconds": round(write_s, 2),
        "index_seconds": round(time.perf_counter() - t, 2),
        "lancedb": lancedb.__version__,
    }
    info_path.write_text(json.dumps(info))
    params["index_type"] = "IVF_PQ"
    print(f"LanceDB IVF_PQ {params}: {info['index_seconds']} s", flush=True)
    return info


# ---- Milvus Lite --------------------------------------------------------------------------------
class MilvusLite:
    """``milvus-lite server`` on a free loopback port (data kept under ``--workdir``)."""

    def __init__(self, args):
        import subprocess

        from pipelines.local_ray import free_port

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
        ("IVF_SQ8", {"nlist": lance_partitions(n)}),
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
    """Build (or reuse) the three indexes; build timings are kept next to them."""
    import faiss

    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))  # builds use every core
    path = args.workdir / f"peers-build-{args.n}-{args.dim}-{args.shards}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    ours = ql.build_store(args, base, ids, uris)
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
    saved["lancedb"] = build_lance(args, base)
    if not args.skip_milvus:
        server = MilvusLite(args)
        try:
            saved["milvus_lite"] = build_milvus(args, base, server)
        finally:
            server.close()
    path.write_text(json.dumps(saved))
    return saved


# ---- measuring -----------------------------------------------------------------------------------
def faiss_searcher(shards):
    """``search(q, nprobe, candidates) -> ids``: scatter over ``shards`` in-process and merge."""
    from index.query.merge import merge_topk

    def search(q, nprobe, candidates):
        per_shard = [
            s.search(q[None, :], K, nprobe=nprobe, candidates=candidates)[0] for s in shards
        ]
        return [h.id for h in merge_topk(per_shard, K, "ip")]

    return search


def lance_searcher(args, ids: list[str]):
    import lancedb

    tbl = lancedb.connect(str(lance_dir(args))).open_table("vectors")

    def search(q, nprobe, refine_factor):
        query = tbl.search(q).distance_type(LANCE_METRIC).nprobes(nprobe)
        query = query.select(["row"]).limit(K)
        if refine_factor:
            query = query.refine_factor(refine_factor)
        return [ids[r] for r in query.to_arrow()["row"].to_pylist()]

    return search


def sweep(name, search, grid: dict, queries, truth, ids, args) -> list[dict]:
    """Every grid point on ``--tune-queries`` single queries: recall@10, p50/p99 (c=1)."""
    (knob_a, values_a), (knob_b, values_b) = grid.items()
    subset = slice(0, args.tune_queries)
    points = []
    for a in values_a:
        for b in values_b:
            for i in range(5):  # warm caches
                search(queries[i], a, b)
            stats, found = ql.run_load(
                lambda i, a=a, b=b: search(queries[i], a, b), args.tune_queries, 1
            )
            found = [found[i] for i in range(args.tune_queries)]
            point = {knob_a: a, knob_b: b, **stats}
            point["recall_at_10"] = round(ql.recall(found, truth[subset], ids), 4)
            points.append(point)
        print(f"{name}: {points[-len(values_b) :]}", flush=True)
    return points


def operating_point(points: list[dict], target: float) -> dict:
    """The lowest-p50 point reaching ``target`` (else the most accurate one)."""
    ok = [p for p in points if p["recall_at_10"] >= target]
    if not ok:
        return max(points, key=lambda p: (p["recall_at_10"], -p["p50_ms"]))
    return min(ok, key=lambda p: p["p50_ms"])


def measure_point(search, point: dict, knobs, queries, truth, ids, args) -> dict:
    """The operating point on every query: recall, then each concurrency level."""
    a, b = (point[k] for k in knobs)
    n = len(queries)
    out = {k: point[k] for k in knobs}
    out["recall_at_10"] = round(ql.recall([search(q, a, b) for q in queries], truth, ids), 4)
    for c in args.concurrency:
        load = os.getloadavg()[0]
        stats, _ = ql.run_load(lambda i: search(queries[i % n], a, b), args.requests, c)
        stats["loadavg_1m_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        out[str(c)] = stats
    return out


def http_points(args, frontier: list[dict], chosen: dict) -> list[dict]:
    """Ours over HTTP: the in-process frontier at c=1, then the chosen point at every level."""
    pts = [
        {
            "label": f"nprobe={p['nprobe']} candidates={p['candidates']}",
            "body": {"nprobe": p["nprobe"], "candidates": p["candidates"]},
            "concurrency": [1],
            "requests": args.tune_queries,
        }
        for p in frontier
    ]
    step = max(1, len(pts) // 4)  # at most ~5 frontier points: each costs a pass over the queries
    pts = pts[::step]
    pts.append(
        {
            "label": "operating point",
            "body": {"nprobe": chosen["nprobe"], "candidates": chosen["candidates"]},
            "concurrency": args.concurrency,
            "requests": args.requests,
        }
    )
    return pts


def measure_all(args, build: dict, queries, truth, ids) -> dict:
    import faiss

    from index.ann.shard_index import ShardIndex
    from index.storage.store import Store

    faiss.omp_set_num_threads(1)  # one query, one thread: as each Serve searcher replica
    store = Store(build["ours"]["store"])
    shards = [ShardIndex.load(store, s) for s in range(args.shards)]
    single = ShardIndex.open_dir(args.workdir / f"single-{args.n}-{args.dim}")
    systems = {
        "ours_inprocess": (faiss_searcher(shards), OURS_GRID),
        "faiss_inprocess": (faiss_searcher([single]), SINGLE_GRID),
        "lancedb": (lance_searcher(args, ids), LANCE_GRID),
    }
    out: dict = {}
    for name, (search, grid) in systems.items():
        points = sweep(name, search, grid, queries, truth, ids, args)
        chosen = operating_point(points, args.target_recall)
        out[name] = {
            "grid": points,
            "frontier": pareto(points, "p50_ms", "recall_at_10"),
            "operating_point": measure_point(search, chosen, grid, queries, truth, ids, args),
        }
        print(f"{name} operating point: {out[name]['operating_point']}", flush=True)
    del shards, single
    # ours over HTTP at the in-process frontier and at our operating point
    ours = out["ours_inprocess"]
    near = [p for p in ours["frontier"] if p["recall_at_10"] >= args.target_recall - 0.15]
    args.points = json.dumps(http_points(args, near, ours["operating_point"]))
    http = ql.over_http(args, store.uri, queries, truth, ids)["throughput"]
    measured = http["direct_ingress"]["points"]
    out["ours_http"] = {
        "frontier": measured[:-1],
        "operating_point": measured[-1],
        "serve": {k: v for k, v in http.items() if k not in ("proxy", "direct_ingress")},
    }
    # the same app with the shard groups inside the ingress replica (colocate_shards)
    args.colocate = True
    colocated = ql.over_http(args, store.uri, queries, truth, ids)["throughput"]
    args.colocate = False
    measured = colocated["direct_ingress"]["points"]
    out["ours_http_colocated"] = {"frontier": measured[:-1], "operating_point": measured[-1]}
    out["floor_http"] = measure_floor(args, store.uri, queries, truth, ids)
    if not args.skip_milvus:
        out.update(measure_milvus(args, queries, truth, ids))
    return out


def measure_floor(args, store_uri: str, queries, truth, ids) -> dict:
    """The uvicorn floor at ours' HTTP points (same knobs, same code: the same recall)."""
    import subprocess

    import httpx

    from pipelines.local_ray import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "floor_server.py"), "--store", store_uri]
        + ["--port", str(port)],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the floor server did not start")
            time.sleep(0.5)  # pacing the start-up poll
        points = json.loads(args.points)
        measured = ql.measure_points(
            args, f"http://127.0.0.1:{port}/search", queries, points, "floor"
        )["points"]
    finally:
        server.terminate()
        server.wait(30)
    for rows in measured:
        if "found" in rows:
            rows["recall_at_10"] = round(ql.recall(rows.pop("found"), truth, ids), 4)
    return {"frontier": measured[:-1], "operating_point": measured[-1]}


def measure_milvus(args, queries, truth, ids) -> dict:
    """Milvus Lite's two indexes: sweep, operating point, as for the in-process systems."""
    n = milvus_rows(args)
    if n < args.n:  # a capped collection: its own exact truth over its rows
        from benchmarks.common import gaussian_mixture

        base = gaussian_mixture(args.n, args.dim, seed=0)[:n]
        scores = queries @ base.T
        truth = np.argsort(-scores, axis=1)[:, :K]
        del base, scores
    server = MilvusLite(args)
    out = {}
    try:
        built = json.loads(
            (args.workdir / f"peers-build-{args.n}-{args.dim}-{args.shards}.json").read_text()
        )["milvus_lite"]["by_index"]
        for itype, grid in MILVUS_GRIDS.items():
            knob = next(iter(grid))
            server.client.load_collection(built[itype]["collection"])  # a restarted server
            search = milvus_searcher(server.client, built[itype]["collection"], knob, ids)
            points = sweep(f"milvus_{itype}", search, grid, queries, truth, ids, args)
            chosen = operating_point(points, args.target_recall)
            out[f"milvus_lite_{itype.lower()}"] = {
                "rows": n,
                "grid": points,
                "frontier": pareto(points, "p50_ms", "recall_at_10"),
                "operating_point": measure_point(search, chosen, grid, queries, truth, ids, args),
            }
            print(f"milvus {itype} operating point: {out[f'milvus_lite_{itype.lower()}']}")
    finally:
        server.close()
    return out


def best_milvus(result: dict) -> str | None:
    """The Milvus Lite index with the lowest p99 among those reaching the target recall (else
    the most accurate one)."""
    names = [k for k in result if k.startswith("milvus_lite_")]
    if not names:
        return None
    c1 = str(result["concurrency"][0])
    ok = [
        n for n in names if result[n]["operating_point"]["recall_at_10"] >= result["target_recall"]
    ]
    if ok:
        return min(ok, key=lambda n: result[n]["operating_point"][c1]["p99_ms"])
    return max(names, key=lambda n: result[n]["operating_point"]["recall_at_10"])


def headline(result: dict) -> dict:
    ours, faiss_, lance = (
        result[k]["operating_point"] for k in ("ours_http", "faiss_inprocess", "lancedb")
    )
    inproc, floor = (result[k]["operating_point"] for k in ("ours_inprocess", "floor_http"))
    colocated = result["ours_http_colocated"]["operating_point"]
    c1, top = str(result["concurrency"][0]), str(max(result["concurrency"]))
    milvus_name = best_milvus(result)
    milvus = result[milvus_name]["operating_point"] if milvus_name else None
    extra = {
        "floor_http_p50_ms": floor[c1]["p50_ms"],
        "floor_http_p99_ms": floor[c1]["p99_ms"],
        "floor_http_qps": floor[top]["qps"],
        "floor_recall_at_10": floor["recall_at_10"],
        "ours_qps_over_inprocess_shards": round(ours[top]["qps"] / inproc[top]["qps"], 3),
        "ours_qps_over_floor": round(ours[top]["qps"] / floor[top]["qps"], 3),
        "ours_p50_over_floor": round(ours[c1]["p50_ms"] / floor[c1]["p50_ms"], 3),
        "ours_colocated_http_p50_ms": colocated[c1]["p50_ms"],
        "ours_colocated_http_p99_ms": colocated[c1]["p99_ms"],
        "ours_colocated_qps": colocated[top]["qps"],
        "ours_colocated_p50_over_floor": round(colocated[c1]["p50_ms"] / floor[c1]["p50_ms"], 3),
        "ours_colocated_qps_over_inprocess_shards": round(
            colocated[top]["qps"] / inproc[top]["qps"], 3
        ),
    }
    if milvus is not None:
        extra.update(
            milvus_lite_index=milvus_name.removeprefix("milvus_lite_").upper(),
            milvus_lite_rows=result[milvus_name]["rows"],
            milvus_lite_p50_ms=milvus[c1]["p50_ms"],
            milvus_lite_p99_ms=milvus[c1]["p99_ms"],
            milvus_lite_qps=milvus[top]["qps"],
            milvus_lite_recall_at_10=milvus["recall_at_10"],
        )
    return {
        **extra,
        "recall_at_10": min(p["recall_at_10"] for p in (ours, faiss_, lance)),
        "ours_http_p99_ms": ours[c1]["p99_ms"],
        "faiss_inprocess_p99_ms": faiss_[c1]["p99_ms"],
        "lancedb_p99_ms": lance[c1]["p99_ms"],
        "ours_qps": ours[top]["qps"],
        "lancedb_qps": lance[top]["qps"],
        "faiss_inprocess_qps": faiss_[top]["qps"],
        "ours_http_p50_ms": ours[c1]["p50_ms"],
        "faiss_inprocess_p50_ms": faiss_[c1]["p50_ms"],
        "lancedb_p50_ms": lance[c1]["p50_ms"],
        "recall_at_10_each": {
            "ours_http": ours["recall_at_10"],
            "faiss_inprocess": faiss_["recall_at_10"],
            "lancedb": lance["recall_at_10"],
        },
        "ours_http_p99_over_faiss": round(ours[c1]["p99_ms"] / faiss_[c1]["p99_ms"], 2),
        "goal": {
            "ours_qps_at_least_half_inprocess_shards": ours[top]["qps"] >= 0.5 * inproc[top]["qps"],
            "ours_qps_at_least_floor": ours[top]["qps"] >= floor[top]["qps"],
            "ours_p50_within_1_5x_floor": ours[c1]["p50_ms"] <= 1.5 * floor[c1]["p50_ms"],
            "ours_colocated_p50_within_1_5x_floor": colocated[c1]["p50_ms"]
            <= 1.5 * floor[c1]["p50_ms"],
            "ours_colocated_qps_at_least_floor": colocated[top]["qps"] >= floor[top]["qps"],
            "ours_http_p99_within_2x_faiss": ours[c1]["p99_ms"] <= 2 * faiss_[c1]["p99_ms"],
            "ours_p99_below_lancedb": ours[c1]["p99_ms"] < lance[c1]["p99_ms"],
            "ours_qps_above_lancedb": ours[top]["qps"] > lance[top]["qps"],
        },
    }


COLOURS = {
    "ours_http": "C0",
    "ours_inprocess": "C9",
    "ours_http_colocated": "C8",
    "floor_http": "C1",
    "faiss_inprocess": "C2",
    "lancedb": "C3",
    "milvus_lite_hnsw": "C4",
    "milvus_lite_ivf_sq8": "C5",
}
HTTP_SYSTEMS = (
    "ours_http",
    "ours_http_colocated",
    "floor_http",
)  # measured by ql.measure_points: rows per level


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c1, top = str(result["concurrency"][0]), str(max(result["concurrency"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, colour in COLOURS.items():
        body = result["systems"].get(name)
        if body is None:
            continue
        front = sorted(body["frontier"], key=lambda p: p["recall_at_10"])
        key = c1 if name in HTTP_SYSTEMS else "p99_ms"
        p99 = [p[key]["p99_ms"] if name in HTTP_SYSTEMS else p[key] for p in front]
        ax1.plot([p["recall_at_10"] for p in front], p99, "o-", color=colour, alpha=0.6, label=name)
        op = body["operating_point"]
        ax1.plot(op["recall_at_10"], op[c1]["p99_ms"], "*", color=colour, ms=16, mec="k")
    ax1.axvline(result["target_recall"], color="k", ls=":", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_xlabel(f"recall@10 vs exact (stars: operating points, {result['requests']} requests)")
    ax1.set_ylabel("p99 latency at concurrency 1 (ms)")
    ax1.set_title(f"{result['n_vectors']:,} x {result['dim']}: frontier over each system's knobs")
    ax1.legend(fontsize=8)
    milvus = result.get("milvus_lite_index")
    names = ["ours_http", "ours_http_colocated", "floor_http", "faiss_inprocess", "lancedb"]
    names += [f"milvus_lite_{milvus.lower()}"] if milvus else []
    qps = [result["systems"][n]["operating_point"][top]["qps"] for n in names]
    bars = ax2.bar(names, qps, color=[COLOURS[n] for n in names])
    builds = result["build_seconds"]
    for bar, n in zip(bars, names, strict=True):
        built = f"\nbuild {builds[n]:.0f} s" if builds.get(n) else ""
        ax2.annotate(
            f"{bar.get_height():.0f} QPS{built}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax2.set_ylim(0, 1.3 * max(qps))
    ax2.set_ylabel(f"queries / s at concurrency {top}")
    ax2.set_title(f"at equal recall@10 >= {result['target_recall']} (measured on every query)")
    m = result["machine"]
    fig.suptitle(f"peers on the same vectors, {m['cores']} cores, GPU {m['gpu']}", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TMPDIR", str(args.workdir))
    base, queries = ql.make_data(args)
    ids, uris = ql.ids_uris(args.n)
    build = build_all(args, base, ids, uris)
    truth = ql.ground_truth(args, base, queries)
    del base
    if args.phase == "build":
        print(json.dumps(build, indent=1))
        return 0
    systems = measure_all(args, build, queries, truth, ids)
    ours_build = build["ours"].get("build_s", {})
    result = {
        "n_vectors": args.n,
        "dim": args.dim,
        "k": K,
        "shards": args.shards,
        "target_recall": args.target_recall,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "tune_queries": args.tune_queries,
        "machine": machine_info(),
        "build_seconds": {
            # ours: the shards built one after another in one process (index_build.json has
            # the Ray-parallel wall); FAISS single: build_arrays wall; LanceDB: create_index
            "ours_http": round(sum(ours_build.values()), 1) if ours_build else None,
            "faiss_inprocess": build["faiss_single"]["wall_seconds"],
            "lancedb": build["lancedb"]["index_seconds"],
        },
        "build": build,
        "systems": systems,
        "notes": [
            "ours: Serve throughput mode, direct ingress port, JSON vector queries; each shard "
            "reranks its candidates with float16 vectors; knobs per shard",
            "faiss_inprocess: one index over all N, our policy's factory for N, same float16 "
            "rerank (ShardIndex), 1 OpenMP thread per query, client threads for concurrency",
            "lancedb: embedded, IVF_PQ 8-bit codes of the same size, metric l2 (its dot index "
            "ranked worse on these unit vectors), refine_factor rescoring with float32 vectors; "
            "LanceDB uses its own thread pool",
            "operating point: lowest p50 reaching target_recall on the first tune_queries "
            "queries; its recall here is re-measured on all queries",
        ],
        "command": "flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/peers.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    result = {**headline({**result, **systems}), **result}
    path = write_result(args.name, result)
    plot(json.loads(path.read_text()), RESULTS_DIR / f"{args.name}.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("systems", "build")}, indent=1))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
