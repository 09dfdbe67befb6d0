"""Parts 3 and 4 of ``benchmarks/quality.py``: the options at the defaults its rules chose,
over HTTP against the real app.

3. Caltech-101: every test photo's vector (embedded in-process with the query path's crop) sent
   as JSON to ``POST /search`` (k=100) of the app over the catalogue the real job built, with
   each option off and on: precision@10 and mAP@100.
4. The demo set (``visual_search/demo_images.py``: scikit-image photos, each with 8 edits) in a
   small store: the held-out edits and every catalogue image (id queries), plain and with
   dedup / diversify / exclude_self: distinct source photos in the top-10 and precision@10.
"""

from __future__ import annotations

import time

from benchmarks.answer_scores import DEPTH, K, mean, precision_at, scores_of
from harness.caltech_catalogue import class_of
from harness.closed_loop import post_searches
from harness.serve_store import embed_files
from harness.serving import serving


def app_config(store_uri: str, model: tuple[str, str]):
    from serve.config import ServeConfig

    return ServeConfig(
        store=store_uri,
        model=model[0],
        weights=model[1],
        reload_interval_s=0,
        canary_fraction=0.0,  # the benchmark measures answers, not the canary
        access_log=False,
    )


def http_pass(base: str, bodies: list[dict], params: dict, concurrency: int) -> tuple[list, dict]:
    """Every body to ``POST /search`` with ``params``: the results lists and timings."""
    answers, timing = post_searches(base, [{"json": b} for b in bodies], params, concurrency)
    return [a["results"] for a in answers], {
        "qps": round(timing["qps"], 1),
        "p50_ms": round(timing["p50_ms"], 1),
        "p99_ms": round(timing["p99_ms"], 1),
        "partial_answers": sum(a["partial"] for a in answers),
    }


def passes(d: dict) -> tuple[dict, dict]:
    """POST /search parameters of each HTTP pass, with the defaults the rules chose (sent
    explicitly, so the figures are those of the chosen values whatever the app's constants)."""
    expand = {"expand": "true", "expand_m": d["expand_m"], "expand_alpha": d["expand_alpha"]}
    dedup = {"dedup": d["dedup_threshold"]}
    diversify = {"diversify": d["diversify_lambda"]}
    caltech = {
        "plain": {},
        "expanded": expand,
        "diversified": diversify,
        "deduplicated": dedup,
        "expanded_deduplicated": {**expand, **dedup},
    }
    demo = {
        "plain": {},
        "deduplicated": dedup,
        "diversified": diversify,
        "exclude_self": {"exclude_self": "true"},
        "exclude_self_deduplicated": {"exclude_self": "true", **dedup},
    }
    return caltech, demo


def caltech_http(args, store_uri, test_vectors, test_labels, relevant, model, plan) -> dict:
    bodies = [{"vector": v.tolist()} for v in test_vectors]
    out = {}
    with serving(app_config(store_uri, model)) as served:
        for name, params in plan.items():
            answers, timing = http_pass(
                served.url, bodies, {"k": DEPTH, **params}, args.concurrency
            )
            labels = [[class_of(r["uri"]) for r in a] for a in answers]
            out[name] = {**scores_of(labels, test_labels, relevant), **timing, "params": params}
            print(f"HTTP {name}: {out[name]}")
    return out


def demo_set(args, model: tuple[str, str]) -> dict:
    """The demo's photos and edits, embedded in-process with the query path's crop."""
    from embedding import Embedder, ModelConfig
    from index.rows.sharding import uri_id
    from visual_search.demo_images import group_of, write_demo_images

    images, queries = args.workdir / "demo-images", args.workdir / "demo-queries"
    groups = write_demo_images(images, queries)
    paths = sorted(p for files in groups.values() for p in files)
    query_paths = sorted(queries.glob("*.jpg"))
    embedder = Embedder(ModelConfig(name=model[0], weights=model[1], threads=2))
    vectors, _ = embed_files(paths, embedder)
    query_vectors, _ = embed_files(query_paths, embedder)
    uris = [p.resolve().as_uri() for p in paths]
    return {
        "paths": paths,
        "uris": uris,
        "ids": [uri_id(u) for u in uris],
        "vectors": vectors,
        "labels": [group_of(u) for u in uris],
        "queries": query_vectors,
        "query_labels": [group_of(str(p)) for p in query_paths],
        "embedder": (embedder.name, embedder.weights_tag),
    }


def demo_http(args, demo: dict, model: tuple[str, str], plan: dict) -> dict:
    from harness.stores import write_store
    from index.live.rebuild import rebuild_shard

    root = args.workdir / f"demo-store-{time.time_ns()}"
    store = write_store(
        root, demo["ids"], demo["uris"], demo["vectors"], 2, model=demo["embedder"][0],
        weights=demo["embedder"][1],
    )  # fmt: skip
    for shard in range(2):
        rebuild_shard(store, shard)
    label = dict(zip(demo["ids"], demo["labels"], strict=True))
    held_out = [{"vector": v.tolist()} for v in demo["queries"]]
    kinds = {
        "held_out_queries": (held_out, demo["query_labels"]),
        "catalogue_id_queries": ([{"id": i} for i in demo["ids"]], demo["labels"]),
    }
    out: dict = {}
    with serving(app_config(store.uri, model)) as served:
        for kind, (bodies, labels) in kinds.items():
            out[kind] = {}
            for name, params in plan.items():
                answers, _ = http_pass(served.url, bodies, {"k": K, **params}, args.concurrency)
                groups = [[label[r["id"]] for r in a] for a in answers]
                found = [{r["id"] for r in a} for a in answers]
                precision = [precision_at(g, q) for g, q in zip(groups, labels, strict=True)]
                own = [b.get("id") in f for f, b in zip(found, bodies, strict=True)]
                out[kind][name] = {
                    "distinct_sources_at_10": mean([len(set(g)) for g in groups], 3),
                    "precision_at_10": mean(precision, 4),
                    "self_in_top_10": mean(own, 3),
                    "params": params,
                }
                print(f"demo {kind} {name}: {out[kind][name]}")
    return out
