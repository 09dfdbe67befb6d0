"""The reliability sections: seeded histories on S3 with faults (what the checker found) and
the soak (memory, errors, lost writes over half an hour)."""

from __future__ import annotations

from benchmarks.readme.tables import fmt, load, md_table


def section_histories() -> str:
    h = load("histories")
    if not h:
        return ""
    totals = [
        [
            fmt(h["histories"]),
            fmt(h["operations"]),
            fmt(h["faults_injected"]),
            fmt(h["replica_kills"]),
            fmt(h["rebuilds_requested"]),
            fmt(h.get("cli_builds")),
            fmt(h["unavailable"]),
            fmt(h["recovery_s_median"], 1),
            fmt(h["anomalies"]),
        ]
    ]
    header = (
        "histories | operations | S3 faults injected | replica kills (SIGKILL) | Rebuilder "
        "rebuilds | command-line builds | 503 while a replica was down | median s to ready "
        "again | anomalies"
    )
    classes = ", ".join(f"{k} {v}" for k, v in h["anomaly_classes"].items())
    return (
        "### Seeded histories on S3 with faults (`histories.json`)\n\n"
        + md_table(totals, header)
        + f"\n\nAnomalies by class: {classes}. Command: `{h['command']}`; how the checker "
        "works and what it found on the way: "
        "[docs/consistency.md](../docs/consistency.md#checked-seeded-histories-on-s3-with-faults-kills-and-clock-skew).\n\n"
        "![histories](results/histories.png)\n"
    )


def section_soak() -> str:
    s = load("soak")
    if not s:
        return ""
    rows = [
        [name, fmt(s["rss_mib_after_warmup"][name], 1), fmt(s["rss_mib_at_end"][name], 1)]
        + [fmt(ratio, 3)]
        for name, ratio in sorted(s["rss_growth_by_process"].items())
    ]
    return (
        f"### Soak (`soak.json`, {fmt(s['minutes'], 1)} minutes, {fmt(s['operations'])} "
        f"operations, {s['rebuilds']} forced rebuilds)\n\n"
        f"RSS growth after warm-up **{fmt(s['rss_growth_ratio'], 3)}x** (all Serve processes; "
        f"worst process {fmt(s['rss_growth_ratio_worst'], 3)}x), errors **{s['errors']}**, "
        f"acknowledged writes lost **{s['acked_writes_lost']}**. Command: `{s['command']}`.\n\n"
        + md_table(rows, "process | RSS MiB after warm-up | RSS MiB at the end | ratio")
        + "\n\n![soak](results/soak.png)\n"
    )
