"""A routed store served over real HTTP (``index.ann.routing``, ``serve.planner.visit``).

One Serve app on 127.0.0.1 over a 4-shard routed store in two groups: a query visits the
router's default shards (``shards_visited``), a caller widens or narrows that with
``shards_probe`` (checked: 422 past the store's shards), and the OpenAPI document says so.
Writes by id: an add lands in its vector's shard, a re-add whose vector moved hides the old
copy in the other shard, a read by id finds the row wherever it is, and a delete hides it
from every shard.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from harness.polling import wait_for
from harness.serving import serve_port
from harness.stores import write_store
from harness.synthetic import gaussian_mixture
from index.ann.routing import train_router
from index.live.rebuild import rebuild_shard
from serve.config import DeploymentSettings, ServeConfig

pytestmark = pytest.mark.slow

SHARDS = 4
DIM = 32
KEY = "routed-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app(ray_local, scratch_root):
    from ray import serve

    from serve.app import build_app

    x = gaussian_mixture(4000, DIM, clusters=40, seed=11)
    router = train_router(x, SHARDS, "ip", cells_per_shard=4)
    ids = [f"r{i:05d}" for i in range(len(x))]
    store = write_store(scratch_root / "routed-store", ids, ids, x, SHARDS, router=router)
    for shard in range(SHARDS):
        rebuild_shard(store, shard)
    port = serve_port(keep_serve=True)
    config = ServeConfig(
        store=store.uri,
        image_queries=False,
        api_key=KEY,
        shards_per_group=2,
        shard_deadline_ms=3000,
        reload_interval_s=0.5,
        delta_poll_s=0.2,
        access_log=False,
        shutdown_wait_s=0.2,
        searcher=DeploymentSettings(num_cpus=0.25),
    )
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        yield client, router, x, ids
    finally:
        client.close()
        serve.delete(config.app_name)


def search(client, vector, **params) -> httpx.Response:
    return client.post("/search", json={"vector": np.asarray(vector).tolist(), **params})


def test_a_query_visits_its_nearest_shards_and_shards_probe_widens_it(app):
    client, router, x, ids = app
    for q in x[:40:8]:
        body = search(client, q, k=5).json()
        assert body["shards_visited"] == router.default_probe and body["shards_total"] == SHARDS
        assert body["partial"] is False and body["shards_answered"] == router.default_probe
        assert {hit["shard"] for hit in body["results"]} <= set(router.probe(q))
        one = search(client, q, k=5, shards_probe=1).json()
        assert one["shards_visited"] == 1
        assert {hit["shard"] for hit in one["results"]} == {router.probe(q, 1)[0]}
        every = search(client, q, k=5, shards_probe=SHARDS).json()
        assert every["shards_visited"] == SHARDS and every["results"][0]["score"] >= 0.999
    r = search(client, x[0], shards_probe=SHARDS + 1)
    assert r.status_code == 422 and r.json()["error"] == "shards_probe_out_of_range"
    r = search(client, x[0], shards_probe=0)
    assert r.status_code == 422 and r.json()["error"] == "shards_probe_out_of_range"
    stats = client.get("/stats").json()
    assert stats["layout"] == "routed" and stats["default_shards_probe"] == router.default_probe
    doc = client.get("/openapi.json").json()
    params = {p["name"]: p for p in doc["paths"]["/search"]["post"]["parameters"]}
    assert params["shards_probe"]["schema"]["maximum"] == SHARDS


def test_writes_by_id_follow_the_vector_and_never_leave_a_second_copy(app):
    client, router, x, ids = app
    far = [i for i in range(len(x)) if router.shards_of(x[i])[0] != router.shards_of(x[0])[0]]
    first, moved = x[0] + 0.01, x[far[0]] + 0.01
    r = client.post("/images", json={"id": "new-1", "vector": first.tolist()}, headers=AUTH)
    assert r.status_code == 201 and r.json()["searchable"] is True, r.text
    assert r.json()["shard"] == router.shards_of(first)[0]
    top = search(client, first, k=1).json()["results"][0]
    assert top["id"] == "new-1" and top["shard"] == router.shards_of(first)[0]

    r = client.post("/images", json={"id": "new-1", "vector": moved.tolist()}, headers=AUTH)
    assert r.status_code == 201 and r.json()["shard"] == router.shards_of(moved)[0]
    top = search(client, moved, k=1).json()["results"][0]
    assert top["id"] == "new-1" and top["shard"] == router.shards_of(moved)[0]
    everywhere = search(client, first, k=50, shards_probe=SHARDS).json()["results"]
    copies = [hit["shard"] for hit in everywhere if hit["id"] == "new-1"]
    assert copies in ([], [router.shards_of(moved)[0]])  # the old copy is hidden
    record = client.get("/images/new-1")
    assert record.status_code == 200 and record.json()["shard"] == router.shards_of(moved)[0]
    by_id = client.post("/search", json={"id": "new-1", "k": 1}).json()["results"][0]
    assert by_id["id"] == "new-1"

    r = client.delete("/images/new-1", headers=AUTH)
    assert r.status_code == 200 and r.json()["hidden"] is True, r.text
    wait_for(lambda: client.get("/images/new-1").status_code == 404, 5.0, "deleted row gone")
    everywhere = search(client, moved, k=50, shards_probe=SHARDS).json()["results"]
    assert "new-1" not in [hit["id"] for hit in everywhere]
    assert client.get(f"/images/{ids[3]}").json()["id"] == ids[3]  # any shard, by id
