"""Ten million vectors through the real path on this one box (#24.1)

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/scale.py [--n 10000000] [--shards 16]

Stages, each with its wall time and the peak summed RSS of every process it ran
(``harness.big_store.PeakRss``):

1. ``write``: ``--n`` vectors of the Gaussian mixture (``--dim`` 256), drawn block by block and
   written as Parquet parts (one per shard per block, as the embedding job writes them); each
   block is folded into the held-out queries' exact top-10 (FAISS ``knn``, float32) before the
   next is drawn, so the catalogue is never in memory whole;
2. ``build``: ``pipelines/build_index.py``'s job on a local Ray: every shard's IVF+PQ index in
   parallel tasks, each asking Ray for its estimated build memory (``--memory-budget`` caps a
   loaded shard's RAM);
3. ``inprocess``: the shards loaded as a replica loads them: RAM bytes per vector by part (codes,
   ids and row table, metadata, the mapped float16 rerank vectors), recall@10 of the index's
   defaults, one shard's single-query search cost at its size;
4. ``http``: the Serve app in the default mode (HAProxy on Serve's HTTP port) in a fresh
   process: the time from ``serve.run`` to the first query answered whole
   (``replica_first_query_s``: every shard loaded and mapped), then JSON vector queries at
   concurrency 1 and 16 (p50/p99, QPS, recall@10);
5. ``s3`` (with ``--s3``): the store's manifests and live versions uploaded to moto's S3 server
   and served from ``s3://`` by a replica on a new node (cold: download, hash, map) and by one
   restarting on that node (warm): ``harness.s3_stage``. ``replica_first_query_s`` is then the
   cold start from S3 (``replica_first_query_local_s``: from the local store).

With ``--cost-sizes 1000000 3000000``, stage ``build-N`` builds one shard of the first N rows
(``build_arrays`` under the policy, 2 FAISS threads); then those and a shard of the store are
timed warm, taking turns query by query: the cost(n) points of the extrapolation. A 10M-row
shard does not fit here: its build holds ~2.5 copies of 10 GB of float32 vectors.

The store is kept under ``--workdir``; ``--reuse`` skips stages 1-2 and keeps the earlier run's
write and build figures (``commands`` lists both runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness import big_store  # noqa: E402
from harness.s3_stage import s3_first_query  # noqa: E402

NAME, K = "scale", 10  # results/scale.json; recall@K


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_scale_args(
        p,
        workdir=Path("/tmp/vs-bench-10m"),
        requests=500,
        quick="200k vectors, 4 shards, fewer requests",
        shards=16,
    )
    p.set_defaults(n=10_000_000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--block", type=int, default=500_000, help="rows drawn and written at a time")
    p.add_argument("--reuse", action="store_true", help="the store and truth of an earlier run")
    p.add_argument("--cost-sizes", type=int, nargs="*", default=[])
    p.add_argument(
        "--s3",
        action="store_true",
        help="also serve the store from moto's S3: a cold and a warm replica's first query",
    )
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.shards, args.requests = min(args.n, 200_000), 4, 200
    args.name = "scale_quick" if args.quick else NAME
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    path = common.RESULTS_DIR / f"{args.name}.json"
    if args.plot_only:
        return common.replot(args.name, plot)
    args.workdir.mkdir(parents=True, exist_ok=True)
    store_uri = str(args.workdir / f"store-{args.n}-{args.dim}-{args.shards}")
    rss, curve = big_store.PeakRss(), []
    result = {"command": common.command(NAME, argv if argv is not None else sys.argv[1:])}
    result["commands"], stages = [result["command"]], rss.stages
    if args.reuse and path.exists():  # keep what the earlier run measured and this one does not
        old = json.loads(path.read_text())
        result.update(build=old.get("build"), commands=old.get("commands", [old["command"]]))
        result["commands"].append(result["command"])
        curve, stages = old.get("cost_curve", []), old["stages"]
    elif not args.reuse:
        result["build"] = big_store.write_and_build(args, store_uri, rss, K)
    queries = np.load(args.workdir / "queries.npy")
    truth = json.loads((args.workdir / "truth.json").read_text())
    with rss.stage("inprocess"):
        result["inprocess"] = big_store.loaded_report(store_uri, args.shards, queries, truth, K)
    with rss.stage("http"):  # before the one-shard builds: they churn the page cache
        http = big_store.http_report(args, store_uri, queries, truth, K)
    if args.s3:
        with rss.stage("s3"):
            result["s3"] = s3_first_query(args, store_uri, queries, truth, K)
    built = []
    for n in args.cost_sizes:
        with rss.stage(f"build-{n}"):
            built.append(big_store.build_one_shard(n, args.dim, queries, args.workdir, args.block))
    if built:
        curve = big_store.time_interleaved(store_uri, built, queries, K)
    rss.close()
    stages = {**stages, **rss.stages}
    levels = http["proxy"]
    result.update(
        n_vectors=result["inprocess"]["rows"],
        dim=args.dim,
        shards=args.shards,
        recall_at_10=levels.get("recall_at_10"),
        http_p50_ms_c1=levels["1"]["p50_ms"],
        http_p99_ms_c1=levels["1"]["p99_ms"],
        qps_c16=levels["16"]["qps"] if "16" in levels else None,
        ram_bytes_per_vector=result["inprocess"]["ram_bytes_per_vector"],
        build_seconds=stages.get("build", {}).get("seconds"),
        peak_rss_gib=max(s["peak_rss_gib"] for s in stages.values()),
        # from S3 when measured (a new node: download, verify, map), else the local store's
        replica_first_query_s=result["s3"]["cold"]["first_query_s"]
        if "s3" in result
        else http["first_query_s"],
        replica_first_query_local_s=http["first_query_s"],
        cost_curve=curve,
        stages=stages,
        http=http,
        store=store_uri,
    )
    common.write_and_plot(args.name, result, plot, headline=True)
    return 0


def plot(result: dict, out: Path) -> None:
    plt = common.pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    stages = result["stages"]
    names = list(stages)
    bars = a.bar(names, [stages[s]["seconds"] for s in names], color="#4C72B0")
    common.label_bars(a, bars, [f"{stages[s]['peak_rss_gib']} GiB" for s in names])
    a.set_ylabel("wall seconds (label: peak RSS of the stage's processes)")
    a.set_title(f"{result['n_vectors']:,} x {result['dim']}, {result['shards']} shards")
    levels = {f"c={c}": v for c, v in result["http"]["proxy"].items() if c.isdigit()}
    for offset, key in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
        b.bar(np.arange(len(levels)) + offset, [v[key] for v in levels.values()], 0.4, label=key)
    b.set_xticks(np.arange(len(levels)), list(levels))
    b.set_ylabel("HTTP ms (Serve's port, default mode)")
    b.set_title(
        f"recall@10 {result['recall_at_10']}, first query {result['replica_first_query_s']} s"
    )
    b.legend()
    c.loglog(*zip(*sorted(big_store.cost_points(result)), strict=True), "o-")
    c.set_xlabel("rows in the shard")
    c.set_ylabel("one shard's single-query search ms p50 (1 thread)")
    c.set_title("cost(n): the shards of this store, and one-shard builds", fontsize=9)
    common.machine_title(fig, "10M vectors on one box", result)
    common.save_figure(fig, out)


if __name__ == "__main__":
    sys.exit(main())
