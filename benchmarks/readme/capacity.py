"""The sections on what a vector costs and which models run: bytes per vector at a recall
target (codes and rerank vectors), and the backbone kinds and text queries measured end to end."""

from __future__ import annotations

from benchmarks.readme.tables import fmt, load, md_table


def _best(variant: dict, target: float) -> dict | None:
    """The fastest grid point of ``variant`` whose recall@10 after float16 rerank >= target."""
    ok = [g for g in variant.get("grid", []) if (g.get("recall_float16") or 0) >= target]
    return min(ok, key=lambda g: g["ms_float16"]) if ok else None


def section_bytes_per_vector() -> str:
    b = load("bytes_per_vector")
    if not b:
        return ""
    target = b["target_recall_at_10"]
    mix = b["mixture"]
    rows = []
    for v in mix["variants"]:
        best = _best(v, target)
        rows.append(
            [
                v["variant"],
                fmt(v["ram_bytes_per_vector"], 1),
                fmt(best["recall_float16"], 3) if best else "below target",
                f"{best['nprobe']} / {best['candidates']}" if best else "-",
                fmt(best["ms_float16"], 2) if best else "-",
                fmt(v["build_seconds"], 0),
            ]
        )
    header = (
        "codes | RAM bytes/vector (codes + ids) | recall@10 (float16 rerank) | nprobe / "
        "candidates | ms/query | build s"
    )
    return (
        f"### Bytes per vector at recall@10 >= {target} (`bytes_per_vector.json`)\n\n"
        f"{fmt(mix['n'])} x {mix['dim']}-d Gaussian mixture, {fmt(mix['queries'])} queries, "
        f"nlist {mix['nlist']}; each row is the fastest grid point reaching the target. "
        f"Cheapest: **{b['chosen_codes']} at {fmt(b['chosen_ram_bytes_per_vector'], 1)} B** "
        f"(`chosen_ram_bytes_per_vector`); the build policy's codes: {b['policy_codes']} at "
        f"{fmt(b['policy_ram_bytes_per_vector'], 1)} B. Command: `{b['command']}`.\n\n"
        + md_table(rows, header)
        + "\n\n![bytes per vector](results/bytes_per_vector.png)\n"
    )


def section_models() -> str:
    m = load("models")
    if not m:
        return ""
    rows = [
        [
            kind,
            f"`{r['model_tag']}`",
            r["dim"],
            r["images"],
            fmt(r["self_retrieval_top1"], 2),
        ]
        for kind, r in m["backbones"].items()
    ]
    header = "kind | model tag | dim | photos | photo finds itself first"
    recall = [
        [
            "default nprobe, rerank",
            fmt(m["text_recall_at_10_vs_exact"], 3),
            fmt(m["image_recall_at_10_vs_exact"], 3),
        ],
        [
            "nprobe 1, rerank",
            fmt(m["text_recall_at_10_nprobe_1"], 3),
            fmt(m["image_recall_at_10_nprobe_1"], 3),
        ],
        [
            "default nprobe, no rerank",
            fmt(m["text_recall_at_10_no_rerank"], 3),
            fmt(m["image_recall_at_10_no_rerank"], 3),
        ],
    ]
    return (
        "### Backbones and text queries (`models.json`)\n\n"
        "Each kind ran the embedding job, the build and the query path (random weights except "
        "Lite0's shipped ones: plumbing, not quality). Command: "
        f"`{m['command']}`.\n\n"
        + md_table(rows, header)
        + "\n\nRecall@10 of the index against exact search of the same vectors:\n\n"
        + md_table(recall, "index setting | text queries | image queries")
        + f"\n\n{m['notes']}\n\n![models](results/models.png)\n"
    )


def section_scale() -> str:
    s = load("scale")
    if not s:
        return ""
    http, parts, inproc = s["http"]["proxy"], s["inprocess"]["bytes_per_vector"], s["inprocess"]
    stages = ", ".join(
        f"{k} {v['seconds']:.0f} s / {v['peak_rss_gib']} GiB" for k, v in s["stages"].items()
    )
    curve = ", ".join(
        f"{fmt(p['rows'])} rows {p['search_p50_ms']} ms" for p in s.get("cost_curve", [])
    )
    return (
        f"### {fmt(s['n_vectors'])} vectors on this box (`scale.json`)\n\n"
        f"{s['dim']}-d Gaussian mixture written as Parquet parts, built by the index job into "
        f"{s['shards']} shards ({', '.join(inproc['factory'])}), served by the Serve app in "
        f"the default mode on Serve's port. recall@10 vs exact **{s['recall_at_10']}**; HTTP "
        f"p50 / p99 at concurrency 1 **{http['1']['p50_ms']:.1f} / {s['http_p99_ms_c1']:.1f} "
        f"ms**, **{s['qps_c16']} QPS** at 16 (p50 / p99 {http['16']['p50_ms']:.0f} / "
        f"{http['16']['p99_ms']:.0f} ms, {http['16'].get('errors', 0)} errors); first query "
        f"answered whole after `serve.run` began: {first_query(s)}; "
        f"RAM **{s['ram_bytes_per_vector']} B/vector** (codes {parts['codes']:.1f}, ids "
        f"{parts['ids']:.0f}, row table {parts['rows']:.1f}, float16 rerank "
        f"{parts['vectors_mmap']:.0f} memory-mapped). Stages (wall, peak RSS of every process "
        f"they ran): {stages}. One shard's warm single-query search (1 thread), a shard of "
        f"this store and one-shard builds taking turns query by query: {curve or 'none'}. "
        "Commands: "
        + "; ".join(f"`{c}`" for c in s.get("commands", [s["command"]]))
        + ".\n\n![10M vectors](results/scale.png)\n"
    )


def first_query(s: dict) -> str:
    """The replica start figures: from the local store, and cold / warm from S3 when measured."""
    local = s.get("replica_first_query_local_s", s["replica_first_query_s"])
    s3 = s.get("s3") or {}
    if not s3:
        return f"**{local} s** (local store)"
    return (
        f"**{local} s** from the local store, **{s3['cold']['first_query_s']} s** by a replica "
        f"on a new node from S3 (moto; downloading, hashing, mapping), "
        f"{s3['warm']['first_query_s']} s restarting on that node"
    )


def section_routing() -> str:
    r = load("routing")
    if not r:
        return ""
    rows = []
    for shards, both in r["layouts"].items():
        h = both["hash"]
        rows.append([f"hash, {shards}", "all", h["recall_at_10"], h["cpu_ms_per_query"],
                     h["qps_c16"], f"{h['p50_ms_c16']:.0f} / {h['p99_ms_c16']:.0f}"])  # fmt: skip
        for p in both["routed"]["points"]:
            mark = " (chosen)" if p["probe"] == both["routed"].get("chosen_probe") else ""
            rows.append([f"routed, {shards}", f"{p['probe']}{mark}", p["recall_at_10"],
                         p["cpu_ms_per_query"], p["qps_c16"],
                         f"{p['p50_ms_c16']:.0f} / {p['p99_ms_c16']:.0f}"])  # fmt: skip
    ratios = ", ".join(
        f"{s} shards **{r[f'routed_over_hash_cpu_{s}']}**"
        for s in r["layouts"]
        if f"routed_over_hash_cpu_{s}" in r
    )
    floor = ""
    if r.get("serve_noop_cpu_ms_per_query") is not None:
        shares = ", ".join(
            f"{s} shards {r[f'serve_noop_over_hash_cpu_{s}']}"
            for s in r["layouts"]
            if f"serve_noop_over_hash_cpu_{s}" in r
        )
        floor = (
            f" A no-op app of the same shape through Serve (`harness.serve_floor`: HAProxy, "
            f"an ingress, one gRPC call to a deployment that answers fixed hits) cost "
            f"{r['serve_noop_cpu_ms_per_query']} ms of server CPU a query in the same run: over "
            f"the hash store's, {shares}, the lowest ratio any routed query could reach here."
        )
    for s, both in r["layouts"].items():
        pair = both.get("paired")
        if pair:
            each = " / ".join(f"{x['ratio']:.3f}" for x in pair["rounds"])
            floor += (
                f" At {s} shards the ratio is the median of {len(pair['rounds'])} rounds that "
                f"served the two stores in turn ({each}; wrk {pair['wrk_seconds']:g} s a side); "
                f"the main run's was {r.get(f'routed_over_hash_cpu_{s}_main_run')}."
            )
    generator = r["layouts"][next(iter(r["layouts"]))]["hash"].get("load_generator", "python")
    return (
        f"### Queries that visit a few shards: routed vs hash (`routing.json`)\n\n"
        f"The same {fmt(r['n_vectors'])} x {r['dim']} vectors hash-sharded and routed "
        "(`visual-search route`, then the index job), each served in the default mode on "
        f"Serve's port; c=16 figures ({generator}), CPU summed over every server process per "
        "query (the load generator left out). Routed CPU per query over hash, at the fewest "
        f"shards visited within 0.01 of the hash store's recall@10: "
        f"{ratios or 'none reached it'}.{floor}\n\n"
        + md_table(
            rows,
            "layout, shards | shards visited | recall@10 | server CPU ms/query | "
            "QPS | p50 / p99 ms",
        )  # fmt: skip
        + f"\n\nCommand: `{r['command']}`.\n\n![routing](results/routing.png)\n"
    )
