"""The billion-vector extrapolation: the measured curves (one shard's search cost against its
size, what scatter-gather adds against the shard count, bytes per vector) carried to 100M and
1B vectors under the stated assumptions (``ASSUME``), with the arithmetic printed."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.readme.tables import load, md_table
from harness.big_store import cost_points

# assumptions of the extrapolation, in one place (everything else is measured)
ASSUME = {
    "shard_vectors": 10_000_000,  # vectors per shard (the unit of placement)
    "target_qps": 1000,  # queries/s the whole system must serve
    "utilisation": 0.5,  # plan cores at 50% busy (p99 headroom)
    "node_cores": 32,
    "node_ram_gib": 256,
    "node_reserved_cores": 2,  # ingress + Ray/OS per node
    "id_bytes": 8,
}


def fit_power(xs, ys) -> tuple[float, float]:
    """y = c * x**alpha, least squares in log-log."""
    alpha, logc = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(math.exp(logc)), float(alpha)


def routed_share() -> dict | None:
    """The measured share of shards a routed query visits (``routing.json``, its most shards
    with a chosen probe): what the routed column of the table scales."""
    r = load("routing") or {}
    measured = [
        (int(s), both["routed"]["chosen_probe"])
        for s, both in r.get("layouts", {}).items()
        if both["routed"].get("chosen_probe")
    ]
    if not measured:
        return None
    shards, probe = max(measured)
    return {
        "shards": shards,
        "probe": probe,
        "share": probe / shards,
        "cpu_ratio": r.get(f"routed_over_hash_cpu_{shards}"),
        "recall": r.get(f"recall_at_10_routed_{shards}"),
    }


def section_extrapolation() -> str:
    q, b = load("query_scaling"), load("index_build")
    if not q or not b:
        return ""
    a = ASSUME
    rows = [(int(s), r) for s, r in q["by_shards"].items()]
    # one run's points (absolute ms differ ~2.5x between runs here): scale.json's when it has 3
    points, source = cost_points(load("scale") or {}), "`scale.json`, one run, interleaved"
    if len(points) < 3:
        points, source = (
            [
                (max(r["inprocess"]["rows_per_shard"]), r["inprocess"]["per_shard_p50_ms"])
                for _, r in rows
            ],
            "`query_scaling.json`",
        )
    n_shard, cost = zip(*sorted(points), strict=True)
    c, alpha = fit_power(n_shard, cost)
    # a deployment per shard: one call per shard, the cost model the extrapolation scales
    first_r = {
        s: (r["http"]["per_shard"] if "per_shard" in r["http"] else r["http"][min(r["http"])])[
            "defaults"
        ]
        for s, r in rows
    }
    overhead = [
        (s, first_r[s]["1"]["p50_ms"] - r["inprocess"]["per_shard_p50_ms"]) for s, r in rows
    ]
    slope, intercept = np.polyfit([s for s, _ in overhead], [o for _, o in overhead], 1)
    bpv_256 = b["bytes_per_vector_ram"]
    pad = bpv_256 / (256 / 4 + a["id_bytes"])  # fast-scan block padding measured at 256-d
    dim_in = q["dim"]
    lines = [
        "## The billion-vector extrapolation (from the measured curves)\n",
        "Measured on this box (2 cores; `query_scaling.json`, `scale.json`, `index_build.json`):\n",
        f"- one shard's single-query search cost (tuned nprobe + rerank, 1 thread; {source}) at "
        + ", ".join(f"{n / 1e6:.3g}M -> {ms:.2f} ms" for n, ms in zip(n_shard, cost, strict=True))
        + f" fits **cost(n) = {c:.3g} ms x n^{alpha:.2f}** "
        f"(= {c * 1e6**alpha:.2f} ms at 1M; IVF lists grow ~sqrt(n), so the scan grows ~n^0.5).",
        "- what HTTP + Serve + scatter-gather adds over one shard's search, at concurrency 1: "
        + ", ".join(f"S={s}: {o:.1f} ms" for s, o in overhead)
        + f"; linear fit **{intercept:.1f} ms + {slope:.2f} ms x S**. On 2 cores the S shard "
        "searches cannot run side by side, so the slope here includes their queueing; on a "
        "cluster with a core per replica the slope is the ingress's own cost per shard call.",
        f"- codes + ids: **{bpv_256:.1f} B/vector** at {dim_in}-d (PQ {dim_in // 2}x4-bit = "
        f"{dim_in // 4} B + 8 B id; x{pad:.3f} fast-scan block padding).\n",
    ]
    target_ms = cost_at = c * a["shard_vectors"] ** alpha
    lines.append(
        f"Assumptions: {a['shard_vectors'] / 1e6:g}M vectors per shard; "
        f"{a['target_qps']:,} QPS; cores planned at {a['utilisation']:.0%} busy; nodes of "
        f"{a['node_cores']} cores / {a['node_ram_gib']} GiB with {a['node_reserved_cores']} cores "
        f"reserved; search cost scales with the code bytes scanned and the rerank dot products, "
        f"i.e. ~linearly in d (x d/{dim_in}). One shard at {a['shard_vectors'] / 1e6:g}M and "
        f"{dim_in}-d: {c:.3g} x ({a['shard_vectors']:.0e})^{alpha:.2f} = **{cost_at:.2f} ms**.\n"
    )
    table, replicas_1b = [], 1
    routed = routed_share()
    if routed:
        lines.append(
            f"Routed layout (`routing.json`): at {routed['shards']} shards a query visited "
            f"**{routed['probe']}** (recall@10 {routed['recall']}; server CPU per query "
            f"{routed['cpu_ratio']}x the hash layout's, ingress and HTTP included). The routed "
            "column assumes the same share of shards holds a query's neighbours at S shards; "
            "it depends on how the data clusters (real CNN embeddings needed 4 of 16 shards for "
            "97 % of the top-10 where this mixture needs 1, `docs/indexes.md`). It leaves out "
            "that a routed shard's search costs more than a hash shard's of the same size: its "
            "cells are dense, so its build tunes deeper rerank (6,400 candidates where hash "
            "shards took 400; on one 625k-row routed shard of the 10M store 15 ms against "
            "~3 ms), so read the routed column as a lower bound, up to ~5x low.\n"
        )
    for total in (100_000_000, 1_000_000_000):
        for dim, label, code in (
            (512, "512-d, DESIGN's PQ64", 64),
            (512, "512-d, policy dim/4", 128),
            (1280, "1280-d default model, dim/4", 320),
        ):
            shards = math.ceil(total / a["shard_vectors"])
            bpv = (code + a["id_bytes"]) * pad
            ram_codes = total * bpv / 1e9
            f16 = total * dim * 2 / 1e12
            sq8 = total * dim / 1e12
            ms = target_ms * dim / dim_in
            core_s = a["target_qps"] * shards * ms / 1000  # each query touches every shard
            cores = core_s / a["utilisation"]
            visits = math.ceil(routed["share"] * shards) if routed else shards
            routed_cores = cores * visits / shards
            replicas = max(1, math.ceil(cores / shards))
            per_node = a["node_cores"] - a["node_reserved_cores"]
            shard_gb = a["shard_vectors"] * bpv / 1e9
            nodes_cpu = math.ceil(shards * replicas / per_node)
            # RAM per node: its replicas' codes (shared page cache when the same shard repeats is
            # not assumed) + room to cache SQ8 rerank vectors of its distinct shards
            nodes_ram = math.ceil(shards * replicas * shard_gb / (a["node_ram_gib"] * 0.8))
            nodes = max(nodes_cpu, nodes_ram)
            sg = intercept + slope * shards
            replicas_1b = replicas
            table.append(
                [
                    f"{total / 1e9:g}B" if total >= 1e9 else f"{total / 1e6:g}M",
                    label,
                    f"({code}+8) x {pad:.3f} = {bpv:.0f} B -> {ram_codes:,.0f} GB",
                    f"{f16:,.2f} TB / {sq8:,.2f} TB",
                    shards,
                    f"{ms:.2f} ms",
                    f"{a['target_qps']} x {shards} x {ms:.2f} ms / {a['utilisation']} = "
                    f"{cores:,.0f} cores",
                    f"{visits} of {shards}: {routed_cores:,.0f} cores" if routed else "-",
                    replicas,
                    f"{nodes} ({nodes_cpu} by cores, {nodes_ram} by RAM)",
                    f"{sg:,.0f} ms",
                ]
            )
    lines.append(
        md_table(
            table,
            "N | vectors | codes + ids in RAM | rerank vectors float16 / SQ8 | shards S | one "
            "shard's search | cores for the QPS (hash: every shard) | routed: shards visited, "
            "cores | replicas R per shard (hash) | nodes | scatter-gather "
            "add-on (this box's fit)",
        )
    )
    ingress_ms = q["by_shards"][str(min(s for s, _ in rows))]["http"]
    ingress_ms = (ingress_ms.get("group") or ingress_ms[min(ingress_ms)])["defaults"]["1"][
        "ingress_took_p50_ms"
    ]
    ingress_cores = a["target_qps"] * ingress_ms / 1000 / a["utilisation"]
    lines.append(
        f"\nNot in the cores column: the ingress. Its `took_ms` per query was {ingress_ms} ms "
        f"at one shard here (parse, scatter, the wait for the shard, merge, JSON: an upper "
        f"bound on its CPU), so {a['target_qps']:,} QPS need at most {ingress_cores:.0f} "
        "ingress cores at 50% busy, plus the image model for image queries "
        "(`embed_throughput.json`: ~100 images/s per 2 CPU cores; GPUs at that rate).\n"
    )
    sizes = (2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000)
    lines.append(
        "\nShard size trade-off (1B, 512-d): every query visits every shard, so the CPU a query "
        "costs is S x cost(N/S) ~ N^a x S^(1-a) and fewer, larger shards are cheaper while a "
        "shard fits one replica's RAM and builds in reasonable time: "
        + "; ".join(
            f"{v / 1e6:g}M/shard: S={math.ceil(1e9 / v)}, "
            f"{math.ceil(1e9 / v) * c * v**alpha * 512 / dim_in:,.0f} core-ms/query, "
            f"{v * (128 + a['id_bytes']) * pad / 2**30:.1f} GiB codes/shard"
            for v in sizes
        )
        + f". (cost(n) is measured up to {max(n_shard) / 1e6:g}M rows per shard; beyond that it "
        "is the fitted curve.)\n"
    )
    lines.append(
        "\nReading it: codes + ids stay in RAM (the memory budget of `index/ann/policy.py`); the "
        "float16 rerank vectors (2 x d bytes each) do not fit RAM at 1B and live on local NVMe, "
        "memory-mapped: a query reranks `candidates` rows per shard (200-800 here), i.e. that many "
        "random 1-2.5 KB reads per shard per query (0.2-2 MB); at 1,000 QPS over R replicas of a "
        f"shard each replica reads {a['target_qps']} / R x 400 rows/s, e.g. "
        f"~{a['target_qps'] * 400 / max(1, replicas_1b):,.0f} reads/s at R={replicas_1b} "
        "(1B, 1280-d row): well within one NVMe drive's random-read IOPS; SQ8 (d bytes each) "
        "halves that and fits the page cache of "
        "more nodes, for ~0.001-0.003 recall (float16 vs float32 lost <0.001 here). The "
        "scatter-gather column is this 2-core box's fitted line carried to S shards: it is the "
        "figure that does not extrapolate honestly (here the S searches queue on 2 cores); on a "
        "cluster it should be replaced by a measurement of the ingress alone, and beyond ~50 "
        "shards a two-level gather (an aggregator per group of shards) or fewer, larger shards "
        "keep the fan-out per process bounded.\n"
    )
    return "\n".join(lines)
