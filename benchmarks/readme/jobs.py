"""The batch side's sections: index builds against N, the control plane against catalogue size,
the embedding job against the bare model, and answer quality."""

from __future__ import annotations

from benchmarks.readme.tables import fmt, load, md_table


def section_build() -> str:
    b = load("index_build_sizes")
    if not b:
        return ""
    rows = [
        [fmt(r["n_vectors"]), r["shards"], ", ".join(r["factory"])]
        + [fmt(r["build_wall_seconds"], 1), fmt(r["build_seconds_sum_of_shards"], 1)]
        + [fmt(r["parallel_speedup"], 2), fmt(r["bytes_per_vector_ram"], 1)]
        + [fmt(r["bytes_per_vector_disk_version"], 0), fmt(r["recall_at_10_rerank"], 3)]
        for r in b["configs"]
    ]
    header = "N | shards | factory | wall s | sum of shard builds s | parallel speedup"
    return (
        "### Index build vs N and shards (`index_build_sizes.json`, from `index_build*.json`)\n\n"
        + md_table(rows, header + " | B/vector RAM | B/vector on disk | recall@10 (rerank)")
        + "\n\nOne shard's task uses both cores (speedup ~1 by construction); 2+ shards run one "
        "single-threaded task per core, so 2 cores cap the speedup at 2.\n\n"
        "![index build vs N](results/index_build_sizes.png)\n"
    )


def section_embed() -> str:
    e = load("embed_throughput")
    if not e:
        return ""
    rows = [
        [s["batch_size"], s["actors"], s["threads_per_actor"], fmt(s["images_per_s"], 1)]
        + [fmt(s.get("steady_images_per_s"), 1), fmt(s["bare_model_images_per_s"], 1)]
        + [fmt(s["ratio_to_bare_model"], 2), fmt(s.get("steady_ratio_to_bare_model"), 2)]
        for s in e.get("sweep", [])
    ]
    cpu = (e.get("cpu") or {}).get("share_of_capacity")
    if cpu and not rows:  # no sweep: where the machine's CPU went during the job instead
        before = load("embed_throughput_before") or {}
        old = (before.get("cpu") or {}).get("share_of_capacity", {})
        table = md_table(
            [
                [role, fmt(100 * old[role], 1) if role in old else "-", fmt(100 * v, 1)]
                for role, v in sorted(cpu.items(), key=lambda kv: -kv[1])
            ],
            f"role | % of the CPU, before ({before.get('commit', '-')}) | % now",
        )
        return (
            f"### Embedding throughput (`embed_throughput.json`, {e['model']})\n\n"
            f"Headline ({e.get('images', '?'):,} photos): {fmt(e['pipeline_images_per_s'], 1)} "
            f"images/s end to end vs {fmt(e['bare_model_images_per_s'], 1)} for the bare model: "
            f"ratio **{fmt(e['ratio_to_bare_model'], 2)}** "
            f"(**{fmt(e['steady_ratio_to_bare_model'], 2)}** in steady state, start-up "
            f"{fmt(e.get('startup_s'), 1)} s; goals {e['goal_ratio']} / "
            f"{e.get('goal_steady_ratio', 0.9)}).\n\n{table}\n\n"
            "![embedding throughput](results/embed_throughput.png)\n"
        )
    header = "batch | actors | threads/actor | images/s | steady images/s | bare model images/s"
    return (
        f"### Embedding throughput (`embed_throughput.json`, {e['model']})\n\n"
        f"Headline: {fmt(e['pipeline_images_per_s'], 1)} images/s end to end vs "
        f"{fmt(e['bare_model_images_per_s'], 1)} for the bare model: ratio "
        f"**{fmt(e['ratio_to_bare_model'], 2)}** ({fmt(e['steady_ratio_to_bare_model'], 2)} in "
        f"steady state; goal {e['goal_ratio']}).\n\n"
        + md_table(rows, header + " | ratio | steady ratio")
        + "\n\n![embedding throughput](results/embed_throughput.png)\n"
    )


def section_quality() -> str:
    q = load("quality")
    if not q:
        return ""
    backbones = md_table(
        [
            [name, row["image_size"], fmt(row["precision_at_10"], 4), fmt(row["map_at_100"], 4)]
            + [fmt(row["images_per_s"], 1)]
            for name, row in q["backbones"].items()
        ],
        "backbone | input px | P@10 | mAP@100 | images/s (bare model)",
    )
    http = md_table(
        [
            [name, json_params(row["params"]), fmt(row["precision_at_10"], 4)]
            + [fmt(row["map_at_100"], 4), fmt(row["p50_ms"], 1), fmt(row["qps"], 1)]
            for name, row in q["caltech_http"].items()
        ],
        "pass | parameters | P@10 | mAP@100 | p50 ms | QPS (4 clients)",
    )
    demo_rows = []
    for kind, passes in q["demo_http"].items():
        for name, row in passes.items():
            demo_rows.append(
                [kind.replace("_", " "), name, fmt(row["distinct_sources_at_10"], 2)]
                + [fmt(row["precision_at_10"], 3), fmt(row["self_in_top_10"], 2)]
            )
    demo = md_table(demo_rows, "queries | pass | distinct photos in top-10 | P@10 | self in top-10")
    return (
        "### Answer quality (`quality.json`)\n\n"
        f"Backbones on Caltech-101 ({q['queries']:,} test photos vs {q['catalogue']:,} train "
        f"photos, exact search); default by rule: **{q['default_backbone']}** "
        f"({q['default_backbone_rule']}).\n\n{backbones}\n\n"
        f"Caltech-101 over HTTP, {q['shards']} shards, k=100, options at the defaults the "
        f"sweeps chose:\n\n{http}\n\n"
        f"The demo set ({q['demo_catalogue']} images: scikit-image photos, each with 8 edits; "
        f"{q['demo_queries']} held-out edits and every catalogue image as an id query), k=10:"
        f"\n\n{demo}\n\n![answer quality](results/quality.png)\n"
    )


def json_params(params: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in params.items()) or "-"


def section_control_plane() -> str:
    c = load("control_plane")
    if not c:
        return ""
    rows = []
    for run in c["sizes"]:
        for state in ("before", "after"):
            m = run[state]
            rows.append(
                [f"{run['rows']:,}", state, m["manifest_bytes"], m["files"], m["parts"]]
                + [m["tombstone_parts"], m["base_parts"], m["poll_ms"], m["planning_ms"]]
                + [m["driver"]["peak_rss_mib"]]
            )
    settings = c["settings"]
    return "\n".join(
        [
            "## Control plane vs catalogue size\n",
            f"`python benchmarks/control_plane.py`: {settings['shards']} shards of "
            f"{settings['dim']}-d rows written as {settings['batch_part_rows']}-row batch parts "
            f"plus {settings['api_writes']} one-row API parts and {settings['deletes']} one-id "
            "deletes (*before*), then every shard rebuilt (compacted) and garbage-collected "
            "(*after*). Poll: a replica's delta poll finding nothing new; planning: the "
            "Rebuilder's per-shard check; driver: a re-run's embed planning over the same "
            "inputs (all present).\n",
            md_table(
                rows,
                "rows | state | manifest B | files | parts | tombstone parts | base parts | poll ms"
                " | planning ms | driver peak MiB",
            ),
            "",
            f"Growth {c['growth_is']}: manifest x{c['manifest_bytes_growth']}, poll "
            f"x{c['poll_ms_growth']}, planning x{c['planning_ms_growth']}, driver RSS "
            f"x{c['driver_rss_growth']} (the previous driver's algorithm: "
            f"x{c['driver_rss_growth_previous_algorithm']}). The moto-backed S3 suite in the "
            f"same run: {c['s3_suite']['summary']}.\n",
            "![control plane](results/control_plane.png)\n",
            _idle_line(c),
        ]
    )


def _idle_line(c: dict) -> str:
    """``control_plane_idle.py``'s count, when it has run: an idle replica-shard's requests."""
    idle = c.get("idle")
    if not idle:
        return ""
    now, before = idle["runs"]["backoff"], idle["runs"]["previous"]
    per_kind = sorted(now["by_kind_per_replica_shard_hour"].items())
    kinds = ", ".join(f"{k} {fmt(v, 0)}" for k, v in per_kind)
    requests = fmt(now["requests_per_replica_shard_hour"], 0)
    previous = fmt(before["requests_per_replica_shard_hour"], 0)
    return (
        f"An idle replica-shard (nothing searched or written) makes **{requests} object-store "
        f"requests an hour** with the defaults ({kinds}; polls back off while idle, "
        f"`serve/deployments/idle.py`), against {previous} with the previous ones (delta polls "
        "every 0.5 s), counted against moto through a counting proxy, timers sped up "
        f"{now['speedup']:g}x. Command: `{idle['command']}`.\n"
    )
