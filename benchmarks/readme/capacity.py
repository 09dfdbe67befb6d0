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
