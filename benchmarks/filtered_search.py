"""Filtered search at every selectivity: recall@10 and HTTP latency, ours vs LanceDB's prefilter.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/filtered_search.py [--quick]
    (LanceDB needs the benchmark extra: pip install -e '.[bench]')

Data: ``--n`` (1M) ``gaussian_mixture`` vectors, 256-d, 1,000 clusters, in ``--shards`` (4)
shards built by ``index.live.rebuild.rebuild_shard`` (``harness.synthetic.cached_store``, with
metadata columns), each row with:

- ``bucket``: int, uniform in 0..9999, independent of the vector;
- ``category``: string ``c00``..``c99``, the row's mixture cluster mod 100, so a category lives
  in 10 of the 1,000 clusters (a filter correlated with the vectors, as real categories are);
- ``price``: float, uniform 1..500; ``in_stock``: bool, half the rows.

Filters, two families at 50 %, 10 %, 1 %, 0.1 % and 0.01 % selectivity:

- ``uniform``: ``bucket < 5000`` .. ``bucket < 1`` (matching rows spread over every IVF list);
- ``clustered``: 50 categories, 10 categories, one category, then one category and
  ``bucket < 1000`` / ``< 100`` (matching rows packed in a few IVF lists, usually not the
  query's own: the case a fixed nprobe fails worst);

plus the issue's "in stock, under $50" (about 5 %). Queries are held-out draws of the mixture;
the ground truth of each filter is exact float32 search over its matching rows.

Ours: the real Serve app over HTTP (throughput mode, direct ingress, ``harness.serve_runs``),
JSON ``{"vector", "k": 10, "filter"}`` at concurrency 1, default nprobe and 400 rerank
candidates per shard (as the unfiltered benchmarks); also the same shards in-process
(``LiveShard.search_with_plan``) for the plan each shard chose (exact or IVF, its nprobe).

LanceDB (embedded, in-process, no HTTP) on the same vectors and columns: IVF_PQ as in
``benchmarks/peers.py`` (``harness.lance_table``: ~sqrt(N) partitions, 64 x 8-bit sub-vectors,
L2), a BTREE index on
``bucket`` and a BITMAP index on ``category``, ``where(sql, prefilter=True)``; its nprobes and
refine factor are the cheapest pair reaching recall@10 >= 0.95 unfiltered (a short sweep), run
two ways: ``fixed`` (``nprobes``) and ``adaptive`` (``minimum_nprobes`` = that, ``maximum_nprobes``
= every partition: LanceDB's own answer to filtered recall collapse, lance #3903).

Writes ``benchmarks/results/filtered_search.json`` (headline keys first) and ``.png`` (recall
and p99 vs selectivity).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness import (
    lance_table,  # noqa: E402
    synthetic,  # noqa: E402
)
from harness.closed_loop import run_load  # noqa: E402
from harness.serve_runs import over_http  # noqa: E402

K = 10
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001, 0.0001)
LANCE_GRID = {"nprobes": (16, 32, 64), "refine_factor": (5, 10, 20)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_scale_args(
        p,
        workdir=Path("/tmp/vs-bench-filtered"),
        queries=500,
        queries_help="held-out queries (recall)",
    )
    p.add_argument("--candidates", type=int, default=400, help="per-shard rerank candidates")
    p.add_argument("--skip-lancedb", action="store_true")
    p.add_argument("--name", default="filtered_search")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.requests = min(args.n, 100_000), 300
        args.queries = min(args.queries, 200)
        if args.name == "filtered_search":
            args.name = "filtered_search_quick"
    # what harness.serve_runs reads from args
    args.modes, args.entries, args.concurrency, args.searcher_replicas = (
        ["throughput"],
        ["direct_ingress"],
        [1],
        1,
    )
    return args


# ---- data ----------------------------------------------------------------------------------------
def make_data(args):
    """(base vectors, their clusters, held-out queries)."""
    x, labels = synthetic.gaussian_mixture(args.n + args.queries, args.dim, seed=0, labels=True)
    return x[: args.n], labels[: args.n], x[args.n :]


def metadata_table(labels: np.ndarray, seed: int = 1):
    """The rows' metadata (the module docstring says how each column is drawn)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    n = len(labels)
    names = np.asarray([f"c{i:02d}" for i in range(100)], dtype=object)
    return pa.table(
        {
            "bucket": pa.array(rng.integers(0, 10_000, n), pa.int64()),
            "category": pa.array(names[labels % 100], pa.string()),
            "price": pa.array(np.round(rng.uniform(1, 500, n), 2), pa.float64()),
            "in_stock": pa.array(rng.random(n) < 0.5, pa.bool_()),
        }
    )


def filters() -> list[dict]:
    """Every filter measured: name, family, nominal selectivity, our JSON, LanceDB's SQL."""
    cats, c07 = [f"c{i:02d}" for i in range(100)], {"field": "category", "eq": "c07"}

    def below(n: int) -> dict:
        return {"field": "bucket", "range": {"lt": n}}

    rows = [
        ("uniform", s, below(round(s * 1e4)), f"bucket < {round(s * 1e4)}") for s in SELECTIVITIES
    ]
    rows += [
        ("clustered", 0.5, {"field": "category", "in": cats[:50]}, _sql_in(cats[:50])),
        ("clustered", 0.1, {"field": "category", "in": cats[:10]}, _sql_in(cats[:10])),
        ("clustered", 0.01, c07, "category = 'c07'"),
        ("clustered", 0.001, {"and": [c07, below(1000)]}, "category = 'c07' AND bucket < 1000"),
        ("clustered", 0.0001, {"and": [c07, below(100)]}, "category = 'c07' AND bucket < 100"),
    ]
    out = [
        {"name": f"{fam} {s * 100:g} %", "family": fam, "nominal": s, "filter": body, "sql": sql}
        for fam, s, body, sql in rows
    ]
    in_stock = [{"field": "in_stock", "eq": True}, {"field": "price", "range": {"lt": 50}}]
    example = {"name": "in stock, under $50", "family": "example", "nominal": 0.5 * 49 / 499}
    return [*out, {**example, "filter": {"and": in_stock}, "sql": "in_stock = true AND price < 50"}]


def _sql_in(values: list[str]) -> str:
    return "category IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def masks(meta, flts: list[dict]) -> list[np.ndarray]:
    """Each filter's matching rows, by the index layer's own evaluation."""
    from index.query.filters import evaluate, parse_filter
    from index.rows.columns import Columns
    from index.rows.metadata import schema_of_table

    columns = Columns.from_arrow(meta)
    schema = schema_of_table(meta)
    return [evaluate(parse_filter(f["filter"], schema), columns) for f in flts]


def filtered_truth(args, base, queries, flts, rows_of) -> list[np.ndarray]:
    """Exact float32 top-K row numbers of each query among each filter's rows (cached)."""
    out = []
    for f, mask in zip(flts, rows_of, strict=True):
        key = f["name"].replace(" ", "_").replace("%", "pct").replace(",", "").replace("$", "")
        path = args.workdir / f"gt-{args.n}-{args.dim}-{args.queries}-{key}.npy"
        if path.exists():
            out.append(np.load(path))
            continue
        rows = np.flatnonzero(mask)
        found = synthetic.exact_topk(base[rows], queries, K)
        truth = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
        np.save(path, truth)
        out.append(truth)
    return out


def recall_of(found: list[list[str]], truth: np.ndarray, ids: list[str]) -> float:
    """recall@10 against exact filtered search (a filter with fewer than 10 rows: of those)."""
    got = want = 0
    for f, t in zip(found, truth, strict=True):
        expected = {ids[r] for r in t if r >= 0}
        got += len(set(f[:K]) & expected)
        want += len(expected)
    return got / want if want else 1.0


# ---- ours, in-process: the plans ----------------------------------------------------------------
def in_process(args, store_uri, queries, flts, truths, ids) -> list[dict]:
    """Each filter through the shards' ``LiveShard`` (recall, latency, the plans they chose)."""
    import faiss

    from index.live.delta import load_live_shard
    from index.query.filters import parse_filter
    from index.query.merge import merge_topk
    from index.storage.manifest import load_manifest
    from index.storage.store import Store

    faiss.omp_set_num_threads(1)  # as each Serve searcher replica
    store = Store(store_uri)
    manifest = load_manifest(store)
    shards = [
        load_live_shard(store, s, manifest.shards[s].dir, manifest.dim, manifest.metric)
        for s in range(args.shards)
    ]
    rows = []
    for f, truth in zip(flts, truths, strict=True):
        flt = parse_filter(f["filter"], manifest.metadata)
        plans, found, times = [], [], []
        for q in queries:
            t = time.perf_counter()
            per_shard = []
            for shard in shards:
                hits, plan = shard.search_with_plan(
                    q, K, filter=flt, candidates=args.candidates, fields=[]
                )
                per_shard.append(hits[0])
                plans.append(plan)
            found.append([h.id for h in merge_topk(per_shard, K, "ip")])
            times.append(time.perf_counter() - t)
        ms = np.asarray(times) * 1000
        row = {
            "name": f["name"],
            "recall_at_10": round(recall_of(found, truth, ids), 4),
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "exact_share": round(float(np.mean([p.method == "exact" for p in plans])), 3),
            "ivf_nprobe_median": float(np.median([p.nprobe for p in plans if p.method == "ivf"]))
            if any(p.method == "ivf" for p in plans)
            else None,
            "base_nprobe": shards[0].base.default_nprobe,
        }
        rows.append(row)
        print(f"in-process {f['name']:>22}: {row}", flush=True)
    return rows


# ---- ours over HTTP ------------------------------------------------------------------------------
def http_rows(args, store_uri, queries, flts, truths, truth_all, ids) -> dict:
    points = [{"label": "unfiltered", "body": {}}]
    points += [{"label": f["name"], "body": {"filter": f["filter"]}} for f in flts]
    args.points = [{**p, "concurrency": [1], "requests": args.requests} for p in points]
    http = over_http(args, store_uri, queries, truth_all, ids, point_truths=[truth_all, *truths])
    serve = {k: v for k, v in http["throughput"].items() if k not in ("proxy", "direct_ingress")}
    return {"points": http["throughput"]["direct_ingress"]["points"], "serve": serve}


# ---- LanceDB -------------------------------------------------------------------------------------
def lance_dir(args) -> Path:
    return args.workdir / f"lance-{args.n}-{args.dim}-{lance_table.METRIC}-meta"


def lancedb_rows(args, queries, flts, truths, truth_all, ids) -> dict:
    search = lance_table.searcher(lance_dir(args), ids, K)
    sweep_n = min(len(queries), 200)
    grid = []
    for nprobes in LANCE_GRID["nprobes"]:
        for refine in LANCE_GRID["refine_factor"]:
            found = [search(q, nprobes, refine) for q in queries[:sweep_n]]
            grid.append(
                {
                    "nprobes": nprobes,
                    "refine_factor": refine,
                    "recall_at_10": round(recall_of(found, truth_all[:sweep_n], ids), 4),
                }
            )
    ok = [g for g in grid if g["recall_at_10"] >= 0.95]
    chosen = min(ok, key=lambda g: g["nprobes"] * g["refine_factor"]) if ok else grid[-1]
    print(f"LanceDB operating point: {chosen}", flush=True)
    nprobes, refine = chosen["nprobes"], chosen["refine_factor"]
    out = {"grid": grid, "operating_point": chosen, "fixed": [], "adaptive": []}
    cases = [{"name": "unfiltered", "sql": None}, *flts]
    for mode in ("fixed", "adaptive"):
        for f, truth in zip(cases, [truth_all, *truths], strict=True):

            def call(i, f=f, mode=mode):
                return search(
                    queries[i % len(queries)], nprobes, refine, f["sql"], mode == "adaptive"
                )

            recall = recall_of([call(i) for i in range(len(queries))], truth, ids)
            stats, _ = run_load(call, min(args.requests, 500), 1)
            row = {"name": f["name"], "recall_at_10": round(recall, 4), **stats}
            out[mode].append(row)
            print(f"LanceDB {mode} {f['name']:>22}: {row}", flush=True)
    return out


# ---- report --------------------------------------------------------------------------------------
def headline(result: dict) -> dict:
    http = {p["label"]: p for p in result["ours_http"]["points"]}
    filtered = [f for f in result["filters"] if f["family"] != "example"]
    lance = result.get("lancedb")
    one_pct = [f["name"] for f in filtered if f["nominal"] == 0.01]
    out = {
        "min_recall_at_10": min(http[f["name"]]["recall_at_10"] for f in result["filters"]),
        "p99_ms_unfiltered": http["unfiltered"]["1"]["p99_ms"],
        "p99_ms_selectivity_1pct": max(http[name]["1"]["p99_ms"] for name in one_pct),
        "lancedb_min_recall_at_10": (
            min(r["recall_at_10"] for r in lance["adaptive"] if r["name"] != "unfiltered")
            if lance
            else None
        ),
    }
    out["goal"] = {
        "recall_at_10_at_least_0.95": out["min_recall_at_10"] >= 0.95,
        "p99_1pct_within_2x_unfiltered": out["p99_ms_selectivity_1pct"]
        <= 2 * out["p99_ms_unfiltered"],
    }
    return out


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    http = {p["label"]: p for p in result["ours_http"]["points"]}
    lance = result.get("lancedb")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    # one series per system: (marker, colour, label, {filter name: (recall, p99 ms)})
    ours = {n: (p["recall_at_10"], p["1"]["p99_ms"]) for n, p in http.items()}
    series = [("o", "C0", "ours over HTTP", ours)]
    for mode, colour in (("adaptive", "C3"), ("fixed", "C1")) if lance else ():
        rows = {r["name"]: (r["recall_at_10"], r["p99_ms"]) for r in lance[mode]}
        series.append(("s", colour, f"LanceDB {mode} nprobes", rows))
    for family, ls in {"uniform": "-", "clustered": "--"}.items():
        rows = [f for f in result["filters"] if f["family"] == family]
        x = [f["selectivity"] * 100 for f in rows]
        for marker, colour, label, values in series:
            for ax, i in ((ax1, 0), (ax2, 1)):
                y = [values[f["name"]][i] for f in rows]
                ax.plot(x, y, marker + ls, color=colour, alpha=0.85, label=f"{label}, {family}")
    unfiltered = http["unfiltered"]["1"]["p99_ms"]
    ax2.axhline(unfiltered, color="C0", ls=":", lw=1, label="ours unfiltered p99")
    ax2.axhline(2 * unfiltered, color="k", ls=":", lw=0.8, label="goal: 2x unfiltered p99")
    ax1.axhline(0.95, color="k", ls=":", lw=0.8)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("selectivity (% of rows the filter keeps)")
        ax.invert_xaxis()
    ax1.set_ylabel("recall@10 vs exact filtered search")
    ax2.set(ylabel="p99 latency at concurrency 1 (ms)", yscale="log")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    ax1.set_title(
        f"{result['n_vectors']:,} x {result['dim']} in {result['shards']} shards", fontsize=9
    )
    ax2.set_title("ours: HTTP (Serve); LanceDB: embedded, in-process", fontsize=9)
    common.machine_title(fig, "filtered search vs selectivity", result)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.work_in(args.workdir)
    os.environ.setdefault("LANCE_LOG", "error")  # one deprecation warning per query otherwise
    base, labels, queries = make_data(args)
    meta = metadata_table(labels)
    ids, uris = synthetic.synthetic_rows(args.n)
    build = synthetic.cached_store(
        args.workdir, base, ids, uris, args.shards, args.memory_budget, meta
    )
    flts = filters()
    rows_of = masks(meta, flts)
    for f, mask in zip(flts, rows_of, strict=True):
        f["rows"] = int(mask.sum())
        f["selectivity"] = f["rows"] / args.n
    truth_all = synthetic.cached_truth(args.workdir, base, queries, K)
    truths = filtered_truth(args, base, queries, flts, rows_of)
    lance_build = None if args.skip_lancedb else lance_table.build(lance_dir(args), base, meta)
    del base, rows_of
    inproc = in_process(args, build["store"], queries, flts, truths, ids)
    http = http_rows(args, build["store"], queries, flts, truths, truth_all, ids)
    lance = None if args.skip_lancedb else lancedb_rows(args, queries, flts, truths, truth_all, ids)
    result = {
        "n_vectors": args.n,
        "dim": args.dim,
        "shards": args.shards,
        "k": K,
        "queries": args.queries,
        "requests": args.requests,
        "candidates_per_shard": args.candidates,
        "filters": flts,
        "ours_http": http,
        "ours_inprocess": inproc,
        "lancedb": lance,
        "build": {"ours": build, "lancedb": lance_build},
        "machine": common.machine_info(),
        "command": common.command("filtered_search", argv),
    }
    result = {**headline(result), **result}
    common.write_and_plot(args.name, result, plot, headline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
