"""The sections on finding *the same* object and on the vectors' own geometry: geometric
verification of an image query's results (``verify.json``), region rows that let a crop find
its photo (``regions.json``), learned PCA-whitening (``whitening.json``) and the store transform
it led to, through the system (``transform_http.json``)."""

from __future__ import annotations

from benchmarks.readme.tables import fmt, load, md_table


def section_verify() -> str:
    v = load("verify")
    if not v:
        return ""
    rows = []
    for name, s in v["sets"].items():
        rows.append(
            [
                name,
                f"{fmt(s['queries'])} / {fmt(s['catalogue'])}",
                f"{fmt(s['p_at_1_plain'], 3)} -> **{fmt(s['p_at_1_verified'], 3)}**",
                f"{fmt(s['map_plain'], 3)} -> **{fmt(s['map_verified'], 3)}**",
                fmt(s["answer_in_top"], 3),
                f"{fmt(s['verify_ms_p50'], 1)} / {fmt(s['verify_ms_p99'], 1)}",
                f"{fmt(s['verify_cold_ms_p50'], 1)} / {fmt(s['verify_cold_ms_p99'], 1)}",
            ]
        )
        for kind, k in s["by_kind"].items():
            if name == "caltech":
                rows.append(
                    [
                        f"  {kind}",
                        fmt(k["queries"]),
                        f"{fmt(k['p_at_1_plain'], 3)} -> {fmt(k['p_at_1_verified'], 3)}",
                        f"{fmt(k['map_plain'], 3)} -> {fmt(k['map_verified'], 3)}",
                        fmt(k["answer_in_top"], 3),
                        "",
                        "",
                    ]
                )
    header = (
        "set | queries / catalogue | P@1 plain -> verified | mAP plain -> verified | answer in "
        f"the top {v['top']} | verify ms p50 / p99 (warm) | cold ms p50 / p99"
    )
    return (
        "### Instance search: geometric verification (`verify.json`)\n\n"
        f"The top {v['top']} results of exact search ({v['backbone']}) re-ordered by ORB + "
        f"RANSAC inliers (>= {v['min_inliers']}: the same object; `verify=true`). Command: "
        f"`{v['command']}`.\n\n" + md_table(rows, header) + f"\n\n{v['notes']}\n\n"
        "![verification](results/verify.png)\n"
    )


def section_whitening() -> str:
    w = load("whitening")
    if not w:
        return ""
    rows = []
    for name, table in w["backbones"].items():
        plain = table["plain"]
        rule = w["rules"][name]
        best, pca, small = rule["best_whitened"], rule["best_pca"], rule["pca_same_map"]
        rows.append(
            [
                name,
                f"{fmt(plain['map_at_100'], 4)} ({plain['dim']}-d)",
                f"{fmt(best['map_at_100'], 4)} (d {best['dim']}, power {best['power']:g})",
                "on" if rule["on"] else "off",
                f"{fmt(pca['map_at_100'], 4)} ({pca['dim']}-d, {pca['rerank_bytes_float16']} B)",
                "on" if rule["reduce"] else "off",
                f"{small['dim']}-d: {fmt(small['map_at_100'], 4)}" if small else "-",
            ]
        )
    header = (
        "backbone | mAP@100 plain | best whitened | whitening | best PCA reduction (float16 "
        "rerank bytes) | reduction | smallest d at the plain mAP"
    )
    return (
        "### Learned whitening (`whitening.json`)\n\n"
        "PCA-whitening learned on the catalogue (Caltech-101 train photos), applied to the test "
        f"photos as queries; exact search. Rule: {w['rules']['efficientnet_lite0']['rule']}. "
        f"Command: `{w['command']}`.\n\n"
        + md_table(rows, header)
        + "\n\n![whitening](results/whitening.png)\n"
    )


def section_transform() -> str:
    t = load("transform_http")
    if not t:
        return ""
    rows = []
    for mode, run in t["stores"].items():
        foot, http, exact = run["footprint"], run["http"], run["exact"]
        rows.append(
            [
                f"`--transform {mode}` ({foot['indexed_dim'][0]}-d)",
                f"**{fmt(http['map_at_100'], 4)}** / {fmt(http['precision_at_10'], 4)}",
                f"{fmt(exact['map_at_100'], 4)} / {fmt(exact['precision_at_10'], 4)}",
                fmt(foot["rerank_bytes_per_vector"]),
                fmt(foot["ram_bytes_per_vector"]),
                fmt(foot["disk_bytes_per_vector"]),
                f"{fmt(http['p50_ms'], 1)} / {fmt(http['p99_ms'], 1)}",
                fmt(http["qps"], 1),
                fmt(run["build_seconds"], 1),
            ]
        )
    header = (
        "store | HTTP mAP@100 / P@10 | exact mAP@100 / P@10 | float16 rerank B/vector | RAM "
        "B/vector (codes, ids, rows) | disk B/vector | HTTP p50 / p99 ms | QPS | build s"
    )
    return (
        "### The store's transform through the system (`transform_http.json`)\n\n"
        f"{fmt(t['catalogue'])} Caltech-101 train photos ({t['model']}) in two 4-shard stores "
        f"built by the build job and served by the app; {fmt(t['queries'])} test photos' vectors "
        "sent to `POST /search` (k=100, concurrency 4, the client on the same 2 cores). The "
        f"rule's choice for `auto`: {t['transform_auto']}. Command: `{t['command']}`.\n\n"
        + md_table(rows, header)
        + "\n\n![transform](results/transform_http.png)\n"
    )


def section_regions() -> str:
    r = load("regions")
    if not r:
        return ""
    rows = [
        [
            "none" if g["levels"] == 1 else str(g["levels"]),
            fmt(g["vectors_per_image"]),
            f"{fmt(g['recall_at_1'], 3)} / **{fmt(g['recall_at_10'], 3)}**",
            f"{fmt(g['recall_at_1_exact'], 3)} / {fmt(g['recall_at_10_exact'], 3)}",
            f"{fmt(g['search_ms_p50'], 2)} / {fmt(g['search_ms_p99'], 2)}",
            fmt(g["index_bytes_per_image"]),
            fmt(g["parts_bytes_per_image"]),
            fmt(g["embed_s_per_image"], 3),
        ]
        for g in r["grids"]
    ]
    header = (
        "grid levels | vectors per image | recall@1 / @10 (index) | exact | search ms p50 / p99 "
        "| index B per image | parts B per image | embed s per image"
    )
    http = (
        f"The chosen grid ({r['regions_levels']} levels: {r['regions_rule']}) served on port "
        f"{r['port']}, each crop uploaded once at c=1: recall@1 {fmt(r['http_recall_at_1'], 3)}, "
        f"@10 {fmt(r['http_recall_at_10'], 3)}, p50 {fmt(r['http_p50_ms'], 1)} ms / p99 "
        f"{fmt(r['http_p99_ms'], 1)} ms (load average before / after {r['http_load']}); "
        f"{fmt(100 * r['http_top1_with_region'], 1)} % of the first results named the region "
        "that matched."
    )
    return (
        "### Regions: a crop finds its photo (`regions.json`)\n\n"
        f"{fmt(r['queries'])} crops of 20-50 % of a catalogue photo's area against "
        f"{fmt(r['photos'])} Caltech-101 photos ({r['backbone']}), one store per grid "
        f"(`embed --regions L`). Command: `{r['command']}`.\n\n"
        + md_table(rows, header)
        + f"\n\n{http}\n\n{r['notes']}\n\n![regions](results/regions.png)\n"
    )
