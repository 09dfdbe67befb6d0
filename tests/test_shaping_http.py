"""Answer shaping and the live recall canary through the real Serve app on 127.0.0.1.

The catalogue is CNN embeddings with IVF+PQ indexes (the 8,177 MobileNetV2 vectors of
Caltech-101 photos in ``caltech101-mnv2-1280-angular.hdf5``, 2 shards; where the shared data
folder is absent, its generated stand-in of the same shape: ``harness.ann_files``), plus planted
near-duplicates: two slightly perturbed copies of three rows, as a catalogue holding several
edits of one photo has. Vector and id queries only (``image_queries: false``): shaping acts on
vectors, wherever they came from.

The canary samples every answer here (``canary_fraction: 1``) over a window of ``WINDOW``; the
served index is made worse on purpose by forcing ``nprobe=1`` (one IVF list of each shard), and
the canary's gauge, read from Ray's Prometheus export, must drop and then recover.
"""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from harness.polling import wait_for
from harness.serve_app import running_app
from harness.stores import load_ann, write_store
from index.live.rebuild import rebuild_shard
from index.query import shaping

pytestmark = pytest.mark.slow

SHARDS = 2
WINDOW = 16
PLANTED = (11, 222, 3333)  # rows that get two near-copies each
GAUGE = "ray_visual_search_canary_recall_at_k"
DEDUP = shaping.DEDUP_THRESHOLD


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, ann_dir):
    data = load_ann(ann_dir / "caltech101-mnv2-1280-angular.hdf5")
    train, rng = data["train"], np.random.default_rng(7)
    ids = [f"row-{i}" for i in range(len(train))]
    copies, copy_ids = [], []
    for row in PLANTED:
        for j in range(2):
            v = train[row] + 0.002 * rng.standard_normal(train.shape[1]).astype(np.float32)
            copies.append(v / np.linalg.norm(v))
            copy_ids.append(f"copy-{row}-{j}")
    vectors = np.concatenate([train, np.stack(copies)])
    ids += copy_ids
    store = write_store(
        scratch_root / "shaping-store", ids, [f"mem://{i}" for i in ids], vectors, SHARDS
    )
    for shard in range(SHARDS):
        rebuild_shard(store, shard)
    with running_app(
        store,
        [],
        {},
        image_queries=False,
        model="test-model",
        weights="none",
        canary_fraction=1.0,
        canary_max_per_s=100.0,
        canary_window=WINDOW,
        canary_queue=64,
    ) as running:
        running.extra.update(
            train=train, test=data["test"], vectors=dict(zip(ids, vectors, strict=True))
        )
        yield running


def search(client: httpx.Client, body: dict, **params) -> dict:
    response = client.post("/search", json=body, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def ids_of(body: dict) -> list[str]:
    return [r["id"] for r in body["results"]]


def test_dedup_collapses_near_copies_to_their_best_member(app):
    with app.client() as client:
        for row in PLANTED:
            plain = ids_of(search(client, {"id": f"row-{row}"}, k=10))
            copies = {f"copy-{row}-0", f"copy-{row}-1"}
            assert set(plain[:3]) == {f"row-{row}"} | copies
            body = search(client, {"id": f"row-{row}"}, k=10, dedup="true")
            first = body["results"][0]
            assert first["id"] == f"row-{row}" and copies <= set(first["collapsed"])
            assert not copies & set(ids_of(body)) and len(body["results"]) == 10
            vectors = app.extra["vectors"]
            for result in body["results"]:  # Caltech-101 has near-duplicates of its own too
                for other in result["collapsed"]:
                    assert vectors[result["id"]] @ vectors[other] >= DEDUP - 1e-3


def test_exclude_self_min_score_and_diversify(app):
    row = PLANTED[0]
    me = f"row-{row}"
    with app.client() as client:
        assert ids_of(search(client, {"id": me}, k=5))[0] == me
        assert me not in ids_of(search(client, {"id": me}, k=5, exclude_self="true"))
        # a catalogue vector sent as a query: its own row is left out, its near-copies are not
        vector = app.extra["vectors"][me].tolist()
        out = ids_of(search(client, {"vector": vector}, k=5, exclude_self=True))
        assert me not in out and out[0].startswith(f"copy-{row}-")
        expanded = ids_of(search(client, {"vector": vector}, k=5, exclude_self=True, expand=True))
        assert me not in expanded  # "self" is judged on the query, before expansion moves it
        scores = [r["score"] for r in search(client, {"id": me}, k=50)["results"]]
        floor = scores[20]
        kept = search(client, {"id": me}, k=50, min_score=floor)["results"]
        assert 20 < len(kept) < 50 and min(r["score"] for r in kept) >= floor
        plain = search(client, {"id": me}, k=10)
        assert ids_of(search(client, {"id": me}, k=10, diversify=1.0)) == ids_of(plain)
        spread = ids_of(search(client, {"id": me}, k=10, diversify=0.2))
        assert spread[0] == me and not {f"copy-{row}-0", f"copy-{row}-1"} <= set(spread[:3])


def test_query_expansion_searches_again_with_the_expanded_query(app):
    with app.client() as client:
        changed = 0
        for q in app.extra["test"][:10]:
            plain = search(client, {"vector": q.tolist()}, k=10)
            expanded = search(client, {"vector": q.tolist()}, k=10, expand="true", expand_m=3)
            assert len(expanded["results"]) == 10 and not expanded["partial"]
            changed += ids_of(plain) != ids_of(expanded)
        assert changed > 0
        bad = client.post("/search", json={"id": "row-1"}, params={"expand_m": 0})
        assert bad.status_code == 422 and bad.json()["error"] == "expand_m_out_of_range"
        bad = client.post("/search", json={"id": "row-1", "diversify": 2})
        assert bad.status_code == 422 and bad.json()["error"] == "diversify_out_of_range"


def _live_canary_replicas(ray_local) -> set[str]:
    """The unique ids of this app's live RecallCanary replicas (Serve names its replica actors).

    Ray keeps exporting a dead worker's last gauge values for two minutes, and the session's
    Serve outlives each module's app, so an earlier module's canary series can still be there.
    """
    names = ray_local.util.list_named_actors(all_namespaces=True)
    return {
        entry["name"].rsplit("#", 1)[-1] for entry in names if "#RecallCanary#" in entry["name"]
    }


def _gauge(url: str, replicas: set[str]) -> float | None:
    try:
        text = httpx.get(url, timeout=10).text
    except httpx.TransportError:
        return None
    found = [
        value
        for labels, value in re.findall(rf"^{GAUGE}{{([^}}]*)}} (\S+)$", text, re.M)
        if any(f'replica="{replica}"' in labels for replica in replicas)
    ]
    return float(found[-1]) if found else None


def test_canary_gauge_drops_when_the_index_is_made_worse_and_recovers(app, ray_local):
    """Every answer is sampled; WINDOW answers per phase fill the window with that phase."""
    port = ray_local._private.worker._global_node.metrics_export_port
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    queries = app.extra["test"]

    def quiet(client, recomputed: int = 0) -> dict:
        """The canary once every sample handed to it is done (and ``recomputed`` reached): under
        load it lags behind the answers, and a phase must not count an earlier one's samples."""

        def done():
            c = client.get("/stats").json()["canary"]
            finished = c["recomputed"] + c["dropped"] + c["failed"]
            idle = c["queued"] == 0 and finished >= c["sampled"]
            return c if idle and c["recomputed"] >= recomputed else None

        return wait_for(done, 120, "the canary to finish the samples handed to it")

    def phase(start: int, **params) -> tuple[float, float]:
        with app.client() as client:
            before = quiet(client)["recomputed"]
            for q in queries[start : start + WINDOW]:
                search(client, {"vector": q.tolist()}, k=10, **params)

            canary = quiet(client, before + WINDOW)
        recall = canary["recall_at_k"]
        replicas = _live_canary_replicas(ray_local)

        def exported():
            g = _gauge(metrics_url, replicas)
            return (g,) if g is not None and abs(g - recall) < 1e-6 else None

        (gauge,) = wait_for(
            exported,
            90,
            f"{GAUGE} = {recall} in Ray's Prometheus export",
            interval_s=1.0,
        )
        return recall, gauge

    healthy, _ = phase(0)
    assert healthy >= 0.95
    # one IVF list per shard and the PQ codes' own ranking (no exact rerank): a worse index
    worse, gauge = phase(WINDOW, nprobe=1, rerank="false")
    assert gauge == worse and worse < healthy - 0.2
    recovered, gauge = phase(2 * WINDOW)
    print(f"canary recall@10: healthy {healthy}, made worse {worse}, restored {recovered}")
    assert gauge == recovered >= 0.95
    with app.client() as client:
        canary = client.get("/stats").json()["canary"]
    assert canary["dropped"] == 0 and canary["failed"] == 0 and canary["window"] == WINDOW
