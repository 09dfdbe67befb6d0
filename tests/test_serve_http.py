"""The Serve graph over real HTTP on 127.0.0.1: real photos, real model, real FAISS, two shards.

One module-wide app (Serve start-up is the expensive part): Ingress -> QueryEmbedder and two
ShardSearcher deployments over a store of 60 real Caltech-101 photos. The replica-kill test runs
last because it disturbs the app; Serve is shut down at the end of the module.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.polling import wait_for
from harness.serve_store import caltech_sample, write_caltech_store
from harness.serving import serve_port
from index.rows.sharding import shard_of, uri_id
from serve.config import DeploymentSettings, ServeConfig

pytestmark = pytest.mark.slow

NUM_SHARDS = 2
MAX_UPLOAD = 1 << 20  # 1 MiB in this app, so "too large" is cheap to send


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    from ray import serve

    from serve.app import build_app

    paths = caltech_sample(caltech_dir, classes=6, per_class=10)
    store, vectors = write_caltech_store(scratch_root / "serve-http-store", paths, NUM_SHARDS)
    port = serve_port(keep_serve=True)  # the session's Serve (harness.serving)
    config = ServeConfig(
        store=store.uri,
        max_upload_bytes=MAX_UPLOAD,
        shard_deadline_ms=1500,
        embed_threads=1,
        reload_interval_s=0,
        shutdown_wait_s=0.2,  # its replicas stop at once when the module ends
        shards_per_group=1,  # a deployment per shard: the kill test below loses one shard
        searcher=DeploymentSettings(
            num_cpus=0.25, health_check_period_s=1.0, health_check_timeout_s=5.0
        ),
    )
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        yield SimpleNamespace(client=client, store=store, paths=paths, vectors=vectors, cfg=config)
    finally:
        client.close()
        serve.delete(config.app_name)


def search(app, **kwargs) -> httpx.Response:
    return app.client.post("/search", **kwargs)


def upload(path: Path | bytes, name: str = "q.jpg") -> dict:
    data = path if isinstance(path, bytes) else path.read_bytes()
    return {"files": {"file": (name, data, "image/jpeg")}}


# ---- the happy paths ---------------------------------------------------------------------------
def test_probes_stats_and_docs(app):
    assert app.client.get("/healthz").json() == {"status": "ok"}
    ready = app.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    stats = app.client.get("/stats").json()
    assert stats["num_shards"] == NUM_SHARDS and stats["total_count"] == len(app.paths)
    assert stats["dim"] == 1280 and stats["model"].startswith("efficientnet_lite0@")
    for row in stats["shards"]:
        assert row["version"] >= 1 and row["count"] > 0 and row["memory_bytes"] > 0
    assert app.client.get("/docs").status_code == 200
    spec = app.client.get("/openapi.json").json()
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)


def test_uploaded_catalogue_image_returns_itself_first(app):
    for path in app.paths[::20]:  # three photos, from different classes
        r = search(app, params={"k": 5}, **upload(path))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["partial"] is False and body["shards_answered"] == body["shards_total"] == 2
        assert len(body["results"]) == 5
        top = body["results"][0]
        assert top["uri"] == path.resolve().as_uri() and top["score"] > 0.99
        assert top["shard"] == shard_of(uri_id(top["uri"]), NUM_SHARDS)
        scores = [h["score"] for h in body["results"]]
        assert scores == sorted(scores, reverse=True)


def test_vector_query_matches_exact_search(app):
    uris = list(app.vectors)
    matrix = np.stack([app.vectors[u] for u in uris])
    query = app.vectors[uris[7]]
    r = search(app, json={"vector": query.tolist(), "k": 10})
    assert r.status_code == 200, r.text
    got = [h["uri"] for h in r.json()["results"]]
    exact = [uris[i] for i in np.argsort(-(matrix @ query))[:10]]
    assert got == exact  # flat index + exact rerank: identical to brute force
    # parameters go through: no rerank, explicit nprobe and candidates, k from the query string
    r = search(
        app,
        params={"k": 3, "rerank": "false", "nprobe": 4, "candidates": 20},
        json={"vector": query.tolist()},
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_id_query_finds_the_row_and_its_neighbours(app):
    uri = next(iter(app.vectors))
    row_id = uri_id(uri)
    for kwargs in ({"json": {"id": row_id}}, {"params": {"id": row_id}}):
        r = search(app, **kwargs)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[0]["id"] == row_id and results[0]["uri"] == uri
        assert len(results) == app.cfg.default_k


def test_concurrent_uploads_share_embedder_batches(app):
    import concurrent.futures

    before = app.client.get("/stats").json()["embedder"]
    paths = app.paths[:8]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: search(app, params={"k": 1}, **upload(p)), paths))
    for path, r in zip(paths, responses, strict=True):
        assert r.status_code == 200 and r.json()["results"][0]["uri"] == path.resolve().as_uri()
    after = app.client.get("/stats").json()["embedder"]
    assert after["images"] - before["images"] == 8
    assert after["batches"] - before["batches"] <= 8


# ---- every bad input gets its 4xx, and the app keeps answering --------------------------------
def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_get_their_4xx_and_the_app_keeps_answering(app):
    dim = 1280
    good = app.vectors[next(iter(app.vectors))].tolist()
    jpeg = app.paths[0].read_bytes()
    nan_body = '{"vector": [NaN' + ", 0.1" * (dim - 1) + "]}"
    inf_body = '{"vector": [Infinity' + ", 0.1" * (dim - 1) + "]}"
    as_json = {"content-type": "application/json"}

    def chunked_big():
        for _ in range(24):
            yield os.urandom(64 * 1024)  # 1.5 MiB with no Content-Length: refused mid-stream

    cases = [
        ("not_an_image", 415, upload(b"%PDF-1.4 this is a document, not a picture")),
        ("too_large", 413, upload(os.urandom(MAX_UPLOAD + 100_000))),
        (
            "too_large",
            413,
            {
                "content": chunked_big(),
                "headers": {"content-type": "multipart/form-data; boundary=xyz"},
            },
        ),
        ("decompression_bomb", 413, upload(_png((8000, 8000), "1"), "bomb.png")),
        ("truncated", 422, upload(jpeg[: len(jpeg) // 2])),
        ("empty", 422, upload(b"")),
        ("wrong_vector_length", 422, {"json": {"vector": [0.1] * 10}}),
        ("non_finite_vector", 422, {"content": nan_body, "headers": as_json}),
        ("non_finite_vector", 422, {"content": inf_body, "headers": as_json}),
        ("zero_vector", 422, {"json": {"vector": [0.0] * dim}}),
        ("invalid_vector", 422, {"json": {"vector": ["a"] * dim}}),
        ("k_out_of_range", 422, {"json": {"vector": good}, "params": {"k": 0}}),
        ("k_out_of_range", 422, {"json": {"vector": good, "k": 1001}}),
        ("nprobe_out_of_range", 422, {"json": {"vector": good, "nprobe": 0}}),
        ("candidates_out_of_range", 422, {"json": {"vector": good, "candidates": 10**6}}),
        ("invalid_parameter", 422, {"json": {"vector": good}, "params": {"k": "abc"}}),
        ("unknown_id", 404, {"json": {"id": "0123456789abcdef"}}),
        ("invalid_id", 422, {"json": {"id": 12}}),
        ("invalid_json", 400, {"content": "{not json", "headers": as_json}),
        ("missing_query", 400, {"json": {}}),
        ("missing_query", 400, {"files": {"other": ("x.txt", b"x", "text/plain")}}),
        ("ambiguous_query", 400, {"json": {"vector": good, "id": "abc"}}),
        # EfficientNet-Lite has no text tower: text queries (alone or mixed) are refused
        ("no_text_encoder", 422, {"json": {"text": "red shoes"}}),
        ("no_text_encoder", 422, {"json": {"vector": good, "text": "red", "text_weight": 0.2}}),
        (
            "unsupported_media_type",
            415,
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
        ),
    ]
    for error, status, kwargs in cases:
        r = search(app, **kwargs)
        assert (r.status_code, r.json().get("error")) == (status, error), (error, r.text[:300])
        assert r.json()["detail"]
        assert app.client.get("/healthz").status_code == 200
    # still answering real queries, every shard still loaded
    r = search(app, params={"k": 3}, **upload(app.paths[0]))
    assert r.status_code == 200 and r.json()["results"][0]["uri"] == app.paths[0].resolve().as_uri()
    assert app.client.get("/readyz").status_code == 200


def test_model_mismatch_is_refused_before_deploying(app):
    from serve.app import build_app
    from serve.deployments.embedder import ModelMismatch

    with pytest.raises(ModelMismatch, match="efficientnet_lite0@imagenet"):
        build_app(ServeConfig(store=app.store.uri, weights="none"))
    with pytest.raises(ModelMismatch, match="mobilenet_v2"):
        build_app(ServeConfig(store=app.store.uri, model="mobilenet_v2"))


# ---- a dead shard replica: partial answers, then full ones after Serve replaces it -------------
def _replica_actor_names(deployment: str) -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]
    ]


def _kill_if_ray_worker(pid: int) -> None:
    """SIGCONT + SIGKILL a stopped replica process unless it is gone (or not a Ray worker)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"ray::" in cmdline or b"default_worker" in cmdline:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def test_killed_shard_replica_gives_partial_answers_then_full_ones(app):
    """A shard replica hangs (SIGSTOP, as on a swapping or cut-off node), then dies.

    While it hangs neither Ray nor Serve knows, so every query waits the shard deadline and is
    answered ``partial`` from the other shard (never a 500). Then the replica is killed: Serve
    starts a replacement and answers are full again. (Killing it outright is not enough to see the
    partial window: Serve's router holds a query for a dead replica until the replacement is up,
    which on an idle box can be sooner than the deadline; that query is then simply full.)
    """
    import ray

    query = {"json": {"vector": app.vectors[next(iter(app.vectors))].tolist(), "k": 10}}
    names = _replica_actor_names("ShardSearcher1")
    assert len(names) == 1, names
    replica = ray.get_actor(names[0], namespace="serve")
    pid = ray.get(replica.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGSTOP)
    try:

        def partial():
            r = search(app, **query)
            assert r.status_code == 200, r.text  # never a 500 for the whole query
            body = r.json()
            return body if body["partial"] else None

        body = wait_for(partial, 30, "a partial answer")
        assert body["shards_answered"] == 1 and body["shards_total"] == 2
        assert body["missing_shards"] == [{"shard": 1, "reason": "timeout"}]
        assert body["results"] and all(h["shard"] == 0 for h in body["results"])

        ray.kill(replica, no_restart=True)

        def full():
            r = search(app, **query)
            return r.json() if r.status_code == 200 and not r.json()["partial"] else None

        body = wait_for(full, 120, "full answers after Serve restarts the replica", interval_s=0.5)
        assert body["shards_answered"] == 2 and len(body["results"]) == 10
        assert names[0] not in _replica_actor_names("ShardSearcher1")
        assert app.client.get("/readyz").status_code == 200
    finally:
        _kill_if_ray_worker(pid)
