"""Fresh images over real HTTP: adds and deletes while queries run and two rebuilds swap in.

One real Serve app on 127.0.0.1 (Ingress, QueryEmbedder with the real model, two ShardSearchers,
the Rebuilder) over a small store of real Caltech photos. A thread queries continuously the whole
time; the main thread adds rows (random unit vectors as JSON, and real photos as multipart),
deletes rows, asks for one rebuild and provokes a second one by the delta threshold, then
restarts the whole app. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from harness.polling import wait_for
from harness.serve_store import caltech_sample, write_caltech_store
from harness.serving import serve_port
from harness.traffic import Querier, top1, unit_vectors, versions
from index.rows.sharding import uri_id
from index.storage.manifest import evolve_metadata
from index.storage.publish import list_versions
from serve.config import DeploymentSettings, ServeConfig

pytestmark = pytest.mark.slow

NUM_SHARDS = 2
DIM = 1280
KEY = "sekret-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
THRESHOLD_ROWS = 50  # automatic rebuild of a shard at this delta (rows + tombstone parts)


def _config(store_uri: str) -> ServeConfig:
    return ServeConfig(
        store=store_uri,
        embed_threads=1,
        shard_deadline_ms=3000,
        reload_interval_s=0.5,
        delta_poll_s=0.2,
        api_key=KEY,
        rebuild_delta_rows=THRESHOLD_ROWS,
        rebuild_delta_fraction=0,
        rebuild_check_s=1.0,
        rebuild_gc_grace_s=2.0,
        rebuild_num_cpus=0.5,
        access_log=False,
        shutdown_wait_s=0.2,  # its replicas stop at once when the module ends
        searcher=DeploymentSettings(num_cpus=0.25),
    )


def _start(config: ServeConfig) -> None:
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(config), name=config.app_name, route_prefix="/")


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    from ray import serve

    paths = caltech_sample(caltech_dir, classes=3, per_class=10)
    extra = caltech_sample(caltech_dir, classes=5, per_class=2)[-4:]  # not in the catalogue
    store, vectors = write_caltech_store(scratch_root / "fresh-http-store", paths, NUM_SHARDS)
    port = serve_port(keep_serve=True)  # the session's Serve (harness.serving)
    config = _config(store.uri)
    _start(config)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        yield SimpleNamespace(
            client=client, port=port, store=store, vectors=vectors, extra=extra, config=config
        )
    finally:
        client.close()
        serve.delete(config.app_name)


def test_adds_deletes_and_two_rebuilds_under_continuous_queries(app):
    client, rng = app.client, np.random.default_rng(7)
    catalogue = {uri_id(u): v for u, v in app.vectors.items()}
    added: dict[str, np.ndarray] = {}  # acknowledged adds still expected
    deleted: dict[str, float] = {}
    found_ms: list[float] = []

    def add_vector(row_id: str, vector: np.ndarray) -> None:
        r = client.post("/images", json={"id": row_id, "vector": vector.tolist()}, headers=AUTH)
        assert r.status_code == 201, r.text
        acked = time.monotonic()
        assert r.json()["searchable"] is True and r.json()["id"] == row_id
        wait_for(lambda: top1(client, vector)[0] == row_id, 1.0, f"{row_id} searchable", 0.01)
        found_ms.append((time.monotonic() - acked) * 1000)
        added[row_id] = vector
        querier.probes.append(vector)

    def delete(row_id: str) -> None:
        r = client.delete(f"/images/{row_id}", headers=AUTH)
        assert r.status_code == 200 and r.json()["hidden"] is True, r.text
        deleted[row_id] = time.monotonic()
        vector = added.pop(row_id, None)
        vector = catalogue.pop(row_id) if vector is None else vector
        assert row_id not in top1(client, vector)
        assert client.post("/search", json={"id": row_id}).status_code == 404

    # writes are closed without the key; reads are open
    probe = next(iter(catalogue.values()))
    body = {"vector": probe.tolist()}
    assert client.post("/images", json=body).status_code == 401
    r = client.post("/images", json=body, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert client.delete("/images/abc").status_code == 401
    assert client.post("/admin/rebuild").status_code == 401
    assert client.post("/search", json=body).status_code == 200
    assert client.post("/images", json={"vector": [0.1] * 3}, headers=AUTH).status_code == 422
    r = client.post("/images", headers=AUTH, files={"file": ("x.jpg", b"not an image")})
    assert r.status_code == 415 and r.json()["error"] == "not_an_image"

    start_versions = versions(client)
    querier = Querier(app.port, list(catalogue.values()), deleted)
    querier.start()
    try:
        # --- adds and deletes against the built versions: the delta and tombstones ---------------
        for i in range(40):
            add_vector(f"add-{i:03d}", unit_vectors(rng, 1)[0])
        photo = app.extra[0].read_bytes()
        evolve_metadata(app.store, {"sku": "int"})  # metadata is typed: declare the column
        r = client.post(
            "/images",
            headers=AUTH,
            files={"file": ("new.jpg", photo, "image/jpeg")},
            data={"uri": "s3://bucket/new.jpg", "metadata": '{"sku": 42}'},
        )
        # the id the embedding job gives that URI (the store's id scheme), not a second one
        assert r.status_code == 201 and r.json()["id"] == uri_id("s3://bucket/new.jpg"), r.text
        assert r.json()["uri"] == "s3://bucket/new.jpg"
        photo_id = r.json()["id"]
        files = {"file": ("q.jpg", photo, "image/jpeg")}
        hits = client.post("/search", files=files, params={"k": 1}).json()["results"]
        assert hits[0]["id"] == photo_id and hits[0]["score"] > 0.99
        for row_id in list(catalogue)[:5] + [f"add-{i:03d}" for i in range(5)]:
            delete(row_id)
        stats = client.get("/stats").json()
        assert sum(row["delta"] for row in stats["shards"]) == 36  # 40 + photo - 5 deleted
        assert sum(row["tombstones"] for row in stats["shards"]) == 10

        # --- rebuild 1, on request; adds and deletes go on while it runs and swaps ----------------
        r = client.post("/admin/rebuild", headers=AUTH)
        assert r.status_code == 202 and sorted(r.json()["started"]) == [0, 1], r.text
        for i in range(40, 50):
            add_vector(f"add-{i:03d}", unit_vectors(rng, 1)[0])
        delete("add-040")
        wait_for(
            lambda: all(v > s for v, s in zip(versions(client), start_versions, strict=True)),
            90,
            "rebuild 1 live on both shards",
        )
        first = versions(client)

        # --- rebuild 2, by the delta threshold ------------------------------------------------
        for i in range(50, 50 + 3 * THRESHOLD_ROWS):
            add_vector(f"add-{i:03d}", unit_vectors(rng, 1)[0])
        delete("add-060")
        delete(list(catalogue)[0])
        wait_for(
            lambda: any(v > f for v, f in zip(versions(client), first, strict=True)),
            90,
            "an automatic rebuild",
        )
        status = client.get("/admin/rebuild", headers=AUTH).json()
        triggers = [h["trigger"] for h in status["history"]]
        assert "requested" in triggers and any("delta" in t for t in triggers), status
        assert all(h.get("built") or "error" not in h for h in status["history"]), status

        # --- after the rebuilds: every acknowledged add found, no delete back -------------------
        for row_id, vector in added.items():
            assert top1(client, vector)[0] == row_id, row_id
        for row_id in deleted:
            assert client.post("/search", json={"id": row_id}).status_code == 404
        # garbage collection: only the live and (within the grace period) previous versions
        wait_for(
            lambda: all(len(list_versions(app.store, s)) <= 1 for s in range(NUM_SHARDS)),
            30,
            "old versions collected after the grace period",
            0.5,
        )
        # one more add and delete after the rebuilds: in the delta and tombstones only
        add_vector("after-rebuild", unit_vectors(rng, 1)[0])
        delete("add-070")
    finally:
        querier.stop.set()
        querier.join(30)

    assert querier.ok > 100, querier.ok
    assert querier.failures == [], querier.failures[:5]
    assert querier.resurrected == [], querier.resurrected[:5]
    assert max(found_ms) < 1000
    print(
        f"\nqueries {querier.ok}, failed {len(querier.failures)}, p99 "
        f"{np.percentile(querier.latencies, 99) * 1000:.1f} ms; add-to-searchable p99 "
        f"{np.percentile(found_ms, 99):.1f} ms over {len(found_ms)} adds; "
        f"versions {versions(client)}"
    )

    # --- restart the whole app: nothing acknowledged is lost ---------------------------------
    from ray import serve

    serve.delete(app.config.app_name)
    _start(app.config)
    wait_for(lambda: client.get("/readyz").status_code == 200, 60, "ready after restart")
    for row_id, vector in added.items():
        assert top1(client, vector)[0] == row_id, row_id
    for row_id in [*added][:3]:
        assert client.post("/search", json={"id": row_id}).status_code == 200
    for row_id in deleted:
        assert client.post("/search", json={"id": row_id}).status_code == 404
    hits = client.post("/search", files=files, params={"k": 1}).json()["results"]
    assert hits[0]["id"] == photo_id


def test_an_embedding_job_on_a_grown_folder_feeds_the_same_delta(app, caltech_dir, tmp_path):
    """The batch path: ``pipelines/embed.py`` writes new parts into the served store, and the
    running searchers serve them (found by their own photo) without a rebuild or a restart."""
    from harness import embed_samples as samples
    from pipelines.embed import run_job
    from pipelines.embed_config import EmbedJobConfig

    new = caltech_sample(caltech_dir, classes=7, per_class=1)[-2:]  # classes not served yet
    photos = samples.link_images(new, tmp_path / "grown")
    before = versions(app.client)
    summary = run_job(
        EmbedJobConfig(input=[str(tmp_path / "grown")], store=app.store.uri, batch_size=4, actors=1)
    )
    assert summary.embedded == len(photos) and summary.errors == 0

    def found(photo):
        files = {"file": (photo.name, photo.read_bytes(), "image/jpeg")}
        hits = app.client.post("/search", files=files, params={"k": 1}).json()["results"]
        return hits and hits[0]["uri"] == str(photo)

    for photo in photos:
        wait_for(lambda photo=photo: found(photo), 10, f"{photo.name} searchable from the delta")
    assert versions(app.client) == before  # served from the delta, no rebuild needed
