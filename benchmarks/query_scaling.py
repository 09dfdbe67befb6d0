"""Query scaling over HTTP: p50/p99 and QPS vs shards, serving layout and nprobe, with recall.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/query_scaling.py [--quick] \
        [--shards 1 2] [--layouts per_shard group]     # split runs merge into one results file

The same ``gaussian_mixture`` vectors (default 1M x 256) and held-out queries as
``query_latency.py`` and ``peers.py``, written as a store of S shards (S = 1, 2, 4, 8, 16; the
stores are cached under ``--workdir`` and shared with peers.py) and served by the real Serve app
(``throughput`` mode, direct ingress port) in two layouts, in the same run:

- ``per_shard``: one ShardSearcher deployment per shard (the layout before shard groups): a query
  costs one actor call per shard;
- ``group``: one ShardSearcher replica serving every shard (``shards_per_group`` unset, the
  default on one box): one call per query, concurrent queries searched as one batch.

Per (S, layout):

- the index's own defaults (nprobe and rerank candidates tuned per shard at build time) at
  concurrency 1, 4 and 16: p50/p99, QPS, recall@10 against exact float32 search of all N;
- an nprobe sweep at concurrency 1 (HTTP latency; recall measured in-process on the same shard
  indexes: the searchers run the same ``ShardIndex.search``).

The headline, the most shards' QPS at the top concurrency over one shard's, is also measured in
*pairs* (``--paired-rounds``): one shard and the most shards served in turn, a short ``wrk`` run
each, the order alternating by round; the ratio is the median of the rounds'. This box's speed
drifts by up to 2x within the hour (the same server's QPS moved 385 -> 478 between two runs), so
two levels measured minutes apart in the main run can differ by more than what they measure.

Per S, in-process: one shard's single-query search cost at its size N/S (the per-shard cost
curve of the billion-vector extrapolation) and the whole scatter done sequentially; the HTTP p50
minus one shard's cost is what scatter-gather, HTTP and Serve add at S shards.

On this 2-core box every replica, the ingress and the load generator share the same 2 cores,
so more shards or replicas cannot add capacity: the curves show the fixed cost of fanning out,
not the speedup a cluster with a core (or node) per replica would see.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness import (
    serve_runs,  # noqa: E402
    synthetic,  # noqa: E402
)
from harness.closed_loop import single_query_p50  # noqa: E402
from harness.wrk_load import wrk_path  # noqa: E402

K = 10
LAYOUTS = {"per_shard": 1, "group": 0}  # shards_per_group (0: all shards in one group)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_scale_args(
        p,
        workdir=Path("/tmp/vs-bench-scale"),
        requests=500,
        requests_help="per concurrency level",
        quick="100k vectors, 1/4 shards, fewer requests",
        shards=[1, 2, 4, 8, 16],
    )
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--nprobes", type=int, nargs="*", default=[8, 32])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--sweep-requests", type=int, default=200, help="per nprobe point")
    p.add_argument(
        "--wrk-seconds",
        type=float,
        default=20.0,
        help="each level of the defaults again from wrk (a C load generator) for this long, "
        "where wrk is installed; 0: not",
    )
    p.add_argument(
        "--paired-rounds",
        type=int,
        default=3,
        help="rounds of 1 and the most shards served in turn, wrk at the top level; 0: none",
    )
    p.add_argument("--paired-seconds", type=float, default=15.0, help="wrk's run per pair side")
    p.add_argument("--keep-stores", action="store_true", help="keep stores other than 4 shards")
    p.add_argument("--fresh", action="store_true", help="do not merge with an earlier result")
    p.add_argument("--name", default=None)
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 100_000)
        args.requests, args.sweep_requests = 200, 100
        if args.shards == [1, 2, 4, 8, 16]:
            args.shards = [1, 4, 16]
    args.name = args.name or ("query_scaling_quick" if args.quick else "query_scaling")
    args.modes, args.entries = ["throughput"], ["direct_ingress"]
    return args


def in_process(store_uri: str, num_shards: int, queries, truth, ids, nprobes) -> dict:
    """One shard's cost at its size, the sequential scatter, and recall over nprobe."""
    import faiss

    from index.ann.shard_index import ShardIndex
    from index.live.delta import LiveShard
    from index.live.group_search import GroupQuery, search_group
    from index.live.recall import search_all
    from index.query.merge import merge_topk
    from index.query.share import share_k
    from index.storage.store import Store

    faiss.omp_set_num_threads(1)  # as each searcher replica
    shards = [ShardIndex.load(Store(store_uri), s) for s in range(num_shards)]
    views = [LiveShard(Store(store_uri), s.shard, s, s.dim, s.metric) for s in shards]
    asked = [(view, view.shard, [0]) for view in views]
    ask = GroupQuery(k=K, share=share_k(K, num_shards), visits=num_shards)

    def recall(**kwargs) -> float:
        return round(
            synthetic.recall_of_rows(search_all(shards, queries, K, **kwargs), truth, ids, K), 4
        )

    def one_shard_p50(shard, **kwargs) -> float:
        return single_query_p50(lambda q: shard.search(q, K, **kwargs), queries)

    return {
        "rows_per_shard": [s.count for s in shards],
        "factory": sorted({s.meta["factory"] for s in shards}),
        "default_nprobe": sorted({s.default_nprobe for s in shards}),
        # what a shard probes when every query visits all of them (policy.visit_nprobe)
        "group_nprobe": sorted({s.nprobe_visiting(num_shards) for s in shards}),
        "default_candidates": sorted({s.meta.get("candidates") for s in shards}),
        "per_shard_p50_ms": round(float(np.mean([one_shard_p50(s) for s in shards])), 3),
        "sequential_scatter_p50_ms": single_query_p50(
            lambda q: merge_topk([s.search(q, K)[0] for s in shards], K, "ip"), queries
        ),
        # what a searcher replica runs: the group's shards propose, the group ranks once
        "group_search_p50_ms": single_query_p50(
            lambda q: search_group(asked, q.reshape(1, -1), ask, "ip"), queries
        ),
        "recall_at_10": recall(),
        "nprobe_sweep": [
            {
                "nprobe": p,
                "recall_at_10": recall(nprobe=p),
                "per_shard_p50_ms": one_shard_p50(shards[0], nprobe=p),
            }
            for p in nprobes
        ],
    }


def http(args, store_uri: str, layout: str, candidates: int, queries, truth, ids) -> dict:
    """The Serve app in ``layout``: defaults at every level, then the nprobe sweep."""
    points = [{"label": "defaults", "body": {}, "requests": args.requests, "wrk": True}]
    points += [
        {
            "label": f"nprobe={p}",
            "body": {"nprobe": p},
            "concurrency": [1],
            "requests": args.sweep_requests,
            "recall": False,
        }
        for p in args.nprobes
    ]
    body = served(args, store_uri, layout, candidates, points, queries, truth, ids)
    measured = body["direct_ingress"]["points"]
    return {
        "defaults": measured[0],
        "nprobe_sweep": measured[1:],
        "serve_start_s": body.get("serve_start_s"),
        "processes_rss_mb": body.get("processes_rss_mb"),
    }


def served(args, store_uri, layout: str, candidates: int, points, queries, truth, ids) -> dict:
    """``points`` measured against the Serve app in ``layout`` (one searcher replica, the
    store's rerank ``candidates``): ``serve_runs.over_http``'s throughput-mode body."""
    run = copy.copy(args)
    run.searcher_replicas, run.candidates = 1, candidates
    run.shards_per_group, run.points = LAYOUTS[layout], points
    return serve_runs.over_http(run, store_uri, queries, truth, ids)["throughput"]


def paired(args, stores: dict[int, tuple[str, int]], queries, truth, ids) -> dict | None:
    """``stores``: shards -> (store, rerank candidates), for 1 and the most shards. Each round
    serves both in turn (the order alternating) and runs ``wrk`` at the top concurrency on each;
    the ratio is the median of the rounds' (most over 1), so the box's drift cancels."""
    top, most = max(args.concurrency), max(stores)
    if args.paired_rounds <= 0 or 1 not in stores or most <= 1 or not wrk_path():
        return None
    rounds = []
    for r in range(args.paired_rounds):
        qps = {}
        for shards in (1, most) if r % 2 == 0 else (most, 1):
            run = copy.copy(args)
            run.shards, run.wrk_seconds = shards, args.paired_seconds
            points = [
                {"label": f"paired {r}", "body": {}, "concurrency": [top], "requests": 100,
                 "recall": False, "wrk": True}
            ]  # fmt: skip
            store, candidates = stores[shards]
            body = served(run, store, "group", candidates, points, queries, truth, ids)
            qps[shards] = body["direct_ingress"]["points"][0][f"wrk_{top}"]["qps"]
        rounds.append({"qps_1": qps[1], f"qps_{most}": qps[most], "ratio": qps[most] / qps[1]})
    return {
        "rounds": [{k: round(v, 3) for k, v in x.items()} for x in rounds],
        "median_ratio": round(float(np.median([x["ratio"] for x in rounds])), 3),
        "wrk_seconds": args.paired_seconds,
        "concurrency": top,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    path = common.RESULTS_DIR / f"{args.name}.json"
    if args.plot_only:
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, queries = synthetic.base_and_queries(args.n, args.queries, args.dim)
    ids, uris = synthetic.synthetic_rows(args.n)
    truth = synthetic.cached_truth(args.workdir, base, queries, K)
    rows = {}
    if path.exists() and not args.fresh:  # merge split runs of the same data
        old = json.loads(path.read_text())
        same = (old.get("n_vectors"), old.get("dim")) == (args.n, args.dim)
        if same and "layouts" in old:  # results before shard groups are not merged
            rows = {int(s): r for s, r in old["by_shards"].items()}
            for r in rows.values():  # runs from before runs were dated: the old file's date
                for h in r["http"].values():
                    h.setdefault("measured_at", old["machine"]["when"])
    now = common.machine_info()["when"]  # this run's rows, so that ratios never mix two runs
    built = {}  # shards -> (store, candidates): the paired rounds serve 1 and the most again
    for num_shards in args.shards:
        run = copy.copy(args)
        run.shards = num_shards
        build = synthetic.cached_store(
            args.workdir, base, ids, uris, num_shards, args.memory_budget
        )
        row = {
            "shards": num_shards,
            "build": build,
            "inprocess": in_process(build["store"], num_shards, queries, truth, ids, args.nprobes),
            "http": {},
        }
        candidates = max(c for c in row["inprocess"]["default_candidates"] if c) or 400
        for layout in args.layouts:
            row["http"][layout] = http(run, build["store"], layout, candidates, queries, truth, ids)
            row["http"][layout]["measured_at"] = now
        old = rows.get(num_shards, {})
        for h in old.get("http", {}).values():  # a layout not rerun keeps its run's in-process
            h.setdefault("inprocess", old["inprocess"])
        row["http"] = {**old.get("http", {}), **row["http"]}
        rows[num_shards] = row
        print(summary_line(row, args.concurrency), flush=True)
        built[num_shards] = (build["store"], candidates)
    ends = {s: built[s] for s in built if s in (1, max(built))}
    pairs = paired(args, ends, queries, truth, ids) if "group" in args.layouts else None
    for num_shards, (store, _) in built.items():
        if num_shards != 4 and not args.keep_stores:  # peers.py reuses the 4-shard store
            shutil.rmtree(store, ignore_errors=True)
    lines = table(rows, args.concurrency)
    top = max(args.concurrency)
    by_shards = {
        layout: {x["shards"]: x[f"qps_c{top}"] for x in lines if x["layout"] == layout}
        for layout in LAYOUTS
    }
    group = by_shards["group"]
    same_run = {x["shards"]: x["measured_at"] for x in lines if x["layout"] == "group"}
    from_wrk = [x for x in lines if x["layout"] == "group" and f"wrk_p50_ms_c{top}" in x]
    tails = {  # p99 over p50 at the top level, from wrk (the Python client's beside)
        x["shards"]: {
            "wrk": round(x[f"wrk_p99_ms_c{top}"] / x[f"wrk_p50_ms_c{top}"], 2),
            "python_client": round(x[f"p99_ms_c{top}"] / x[f"p50_ms_c{top}"], 2),
        }
        for x in from_wrk
    }
    wrk_qps = {x["shards"]: x[f"wrk_qps_c{top}"] for x in from_wrk}

    def ratio(qps: dict) -> float | None:  # the most shards over 1, from one run only
        most = max(qps, default=0)
        if 1 not in qps or most <= 1 or same_run[1] != same_run[most]:
            return None
        return round(qps[most] / qps[1], 3)

    most = max(group, default=0)
    client, from_c = ratio(group), ratio(wrk_qps)
    paired_ratio = pairs["median_ratio"] if pairs else None
    result = {
        f"qps_c{top}_by_shards": group,
        # the headline from wrk, a C load generator, in pairs (1 and the most shards served in
        # turn, the median of the rounds: the box's drift cancels); else the main run's wrk
        # ratio; the Python client's own CPU on these 2 cores varies by 3x between runs
        # (harness.wrk_load), its ratio is beside it
        f"qps_c{top}_{most}_over_1_shards": next(
            (x for x in (paired_ratio, from_c, client) if x is not None), None
        ),
        f"qps_c{top}_{most}_over_1_shards_paired": paired_ratio,
        "paired": pairs,
        f"qps_c{top}_{most}_over_1_shards_python_client": client,
        f"qps_c{top}_{most}_over_1_shards_wrk": from_c,
        f"qps_c{top}_by_shards_per_shard_layout": by_shards["per_shard"],
        # the worst shard count's tail, group layout, from wrk (harness.wrk_load: why not threads)
        f"p99_over_p50_c{top}": max((t["wrk"] for t in tails.values()), default=None),
        f"p99_over_p50_c{top}_by_shards": tails,
        "n_vectors": args.n,
        "dim": args.dim,
        "k": K,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "machine": common.machine_info(),
        "serve_path": "throughput mode, direct ingress port, JSON vector queries",
        "layouts": {k: f"shards_per_group={v or 'all'}" for k, v in LAYOUTS.items()},
        "by_shards": {str(s): rows[s] for s in sorted(rows)},
        "table": lines,
        "command": common.command("query_scaling", argv),
    }
    common.write_and_plot(args.name, result, plot)
    for line in result["table"]:
        print(line)
    return 0


def table(rows: dict, levels: list[int]) -> list[dict]:
    """One flat row per (shards, layout): what the README table shows."""
    out = []
    for s in sorted(rows):
        row = rows[s]
        for layout, h in sorted(row["http"].items()):
            d = h["defaults"]
            inprocess = h.get("inprocess", row["inprocess"])  # a layout's own run (main)
            line = {
                "shards": s,
                "layout": layout,
                "measured_at": h.get("measured_at"),
                "rows_per_shard": max(row["inprocess"]["rows_per_shard"]),
                "recall_at_10": d.get("recall_at_10"),
                "per_shard_p50_ms": inprocess["per_shard_p50_ms"],
                "sequential_scatter_p50_ms": inprocess["sequential_scatter_p50_ms"],
                "group_search_p50_ms": inprocess.get("group_search_p50_ms"),  # runs since 12-04
            }
            for c in levels:
                if str(c) in d:
                    line[f"p50_ms_c{c}"] = d[str(c)]["p50_ms"]
                    line[f"p99_ms_c{c}"] = d[str(c)]["p99_ms"]
                    line[f"qps_c{c}"] = d[str(c)]["qps"]
                if f"wrk_{c}" in d:  # the same server from wrk: no Python client's waits
                    line[f"wrk_p50_ms_c{c}"] = d[f"wrk_{c}"]["p50_ms"]
                    line[f"wrk_p99_ms_c{c}"] = d[f"wrk_{c}"]["p99_ms"]
                    line[f"wrk_qps_c{c}"] = d[f"wrk_{c}"]["qps"]
            line["overhead_p50_ms_c1"] = round(
                line.get("p50_ms_c1", float("nan")) - line["per_shard_p50_ms"], 3
            )
            out.append(line)
    return out


def summary_line(row: dict, levels) -> str:
    parts = [f"S={row['shards']}: per-shard {row['inprocess']['per_shard_p50_ms']} ms"]
    for layout, h in row["http"].items():
        d = h["defaults"]
        parts.append(
            f"{layout}: "
            + ", ".join(f"c{c} p50 {d[str(c)]['p50_ms']} QPS {d[str(c)]['qps']}" for c in levels)
            + f", recall {d.get('recall_at_10')}"
        )
    return "; ".join(parts)


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    rows = result["table"]
    levels = result["concurrency"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    for layout in sorted({x["layout"] for x in rows}):
        sel = [x for x in rows if x["layout"] == layout]
        s = [x["shards"] for x in sel]
        (line,) = ax1.plot(s, [x["p50_ms_c1"] for x in sel], "o-", label=f"HTTP p50, {layout}")
        ax1.plot(s, [x["p99_ms_c1"] for x in sel], "x--", color=line.get_color(), alpha=0.6)
        for c in levels[1:]:
            ax2.plot(s, [x[f"qps_c{c}"] for x in sel], "o-", label=f"c={c}, {layout}")
    one = [x for x in rows if x["layout"] == rows[0]["layout"]]
    s = [x["shards"] for x in one]
    ax1.plot(s, [x["per_shard_p50_ms"] for x in one], "k^-", label="one shard in-process")
    ax1.plot(s, [x["sequential_scatter_p50_ms"] for x in one], "kv:", label="all shards in-process")
    grouped = [(x["shards"], x["group_search_p50_ms"]) for x in one if x["group_search_p50_ms"]]
    if grouped:
        ax1.plot(*zip(*grouped, strict=True), "ks--", label="the group's search in-process")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(s, [str(v) for v in s])
        ax.set_xlabel("shards")
    ax1.set(yscale="log", ylabel="ms at concurrency 1 (dashed: HTTP p99)")
    ax1.set_title(f"{result['n_vectors']:,} x {result['dim']}: latency vs shards", fontsize=10)
    ax1.legend(fontsize=7)
    ax2.set_ylabel("queries / s")
    ax2.set_title("throughput vs shards: per-shard deployments vs one group", fontsize=10)
    ax2.legend(fontsize=7)
    for key, row in result["by_shards"].items():
        sweep = row["inprocess"]["nprobe_sweep"]
        layout = "group" if "group" in row["http"] else next(iter(row["http"]))
        http = {p["body"]["nprobe"]: p for p in row["http"][layout]["nprobe_sweep"]}
        pts = [
            (p["nprobe"], p["recall_at_10"], http[p["nprobe"]]["1"]["p50_ms"])
            for p in sweep
            if p["nprobe"] in http
        ]
        ax3.plot([p[1] for p in pts], [p[2] for p in pts], "o-", label=f"{key} shards")
        for nprobe, recall, ms in pts:
            ax3.annotate(str(nprobe), (recall, ms), fontsize=6)
    ax3.set_xlabel("recall@10 vs exact (labels: nprobe per shard)")
    ax3.set_ylabel("HTTP p50 ms at concurrency 1")
    ax3.set_title("nprobe sweep (tuned rerank candidates)", fontsize=10)
    ax3.legend(fontsize=7)
    common.machine_title(fig, "query scaling over HTTP", result)
    common.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
