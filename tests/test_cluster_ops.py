"""The system run the way cluster users run it, against a real ``ray start --head`` on 127.0.0.1.

One head for the module (``harness.ray_head.RayHead``): ``ray job submit`` of the embedding job
(``python pipelines/embed.py``, the README's line) and then of the index build (``visual-search
build``, the console script) into a store of real photos, ``serve deploy`` of a copy of
``serve/serve_config.yaml`` (the store, the port and a few settings changed) answering
``/readyz`` and queries, our metrics in Ray's Prometheus export, the Grafana board
(``deploy/grafana/visual-search.json``) reading exactly the series the app exports, and one request
id followed from the HTTP response header into the JSON logs of the ingress and of a shard replica.
"""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import httpx
import pytest

from harness import embed_samples as samples
from harness.grafana_board import app_series, board_series, load_board
from harness.ops_app import deploy, embed_and_build
from harness.polling import wait_for
from harness.promql import parse_scrape
from harness.ray_head import RayHead
from harness.stores import read_store
from index.storage.manifest import load_manifest
from index.storage.store import Store

pytestmark = pytest.mark.slow

PHOTOS = 40
SHARDS = 2
API_KEY = "ops-test-key"


@pytest.fixture(scope="module")
def head(scratch_root, ray_local):
    # ray_local first: its fixture points TMPDIR at the scratch folder before our head starts.
    cluster = RayHead(
        temp_dir=scratch_root / "ops",  # short: Ray's socket paths must stay < 108 bytes
        env_extra={"RAY_metrics_report_interval_ms": "1000"},  # metrics exported every second
    ).start()
    try:
        yield cluster
    finally:
        cluster.stop()
    assert ray_local.get(ray_local.put(7)) == 7  # the session's own cluster was not touched


@pytest.fixture(scope="module")
def catalogue(head, caltech_dir, tmp_path_factory):
    """Two jobs submitted to the head: embed 40 photos into 2 shards, then build the indexes."""
    work = tmp_path_factory.mktemp("ops")
    photos = samples.link_images(samples.caltech_subset(caltech_dir, PHOTOS), work / "photos")
    root = work / "store"
    logs = embed_and_build(head, work / "photos", root, SHARDS)
    return SimpleNamespace(root=root, photos=photos, **vars(logs))


@pytest.fixture(scope="module")
def deployed(head, catalogue, tmp_path_factory):
    """``serve deploy`` of the repo's config file with only the store, the port and a few
    settings changed."""
    app = deploy(
        head,
        catalogue.root,
        tmp_path_factory.mktemp("deploy"),
        reload_interval_s=1,  # index gauges are published on each manifest poll
        api_key=API_KEY,  # POST /admin/rebuild: the board's rebuild and GC series
        rebuild_gc_grace_s=0,  # a rebuilt shard's old version is collected at once
        canary_fraction=1.0,  # every full answer sampled: the canary reports within seconds
    )
    try:
        yield app
    finally:
        app.client.close()


def test_ray_job_submit_embeds_then_builds_the_indexes(catalogue):
    assert f"embedded {PHOTOS} images (0 skipped as already present), 0 errors" in (
        catalogue.embed_log
    )
    assert "succeeded" in catalogue.embed_log and "succeeded" in catalogue.build_log
    assert f"built {SHARDS} shard(s) ({PHOTOS} vectors)" in catalogue.build_log
    rows, _ = read_store(catalogue.root)
    assert sorted(rows["uri"]) == sorted(str(p) for p in catalogue.photos)  # each exactly once
    manifest = load_manifest(Store(catalogue.root))
    assert manifest.num_shards == SHARDS
    assert sum(s.count for s in manifest.shards.values()) == PHOTOS
    assert all(s.version is not None for s in manifest.shards.values())


def test_serve_deploy_of_the_config_file_answers_readyz_and_queries(deployed, catalogue):
    assert deployed.readyz["ready"] is True
    assert [s["loaded"] for s in deployed.readyz["shards"]] == [True] * SHARDS
    photo = catalogue.photos[5]
    response = deployed.client.post(
        "/search", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, params={"k": 3}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"][0]["uri"] == str(photo)  # the photo finds itself first
    assert body["shards_answered"] == SHARDS and body["partial"] is False


def _samples(text: str, name: str) -> list[dict[str, str]]:
    """Label sets of every sample of metric ``name`` in a Prometheus text exposition."""
    found = []
    for match in re.finditer(rf"^{re.escape(name)}\{{(.*?)\}} \S+$", text, re.M):
        found.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1))))
    return found


def test_metrics_appear_in_rays_prometheus_export(head, deployed):
    vector = [1.0] + [0.0] * 1279
    for _ in range(3):
        assert deployed.client.post("/search", json={"vector": vector}).status_code == 200
    assert deployed.client.post("/search", json={"vector": [1.0, 2.0]}).status_code == 422
    assert deployed.client.get("/stats").status_code == 200

    def exported():
        try:
            text = httpx.get(head.metrics_url, timeout=10).text
        except httpx.TransportError:
            return None
        requests = _samples(text, "ray_visual_search_requests_total")

        def shards(metric: str) -> set[str]:
            return {s.get("shard") for s in _samples(text, "ray_visual_search_" + metric)}

        have = {
            "search 200": any(
                s.get("endpoint") == "/search" and s.get("status") == "200" for s in requests
            ),
            "search 422": any(
                s.get("endpoint") == "/search" and s.get("status") == "422" for s in requests
            ),
            "stats 200": any(s.get("endpoint") == "/stats" for s in requests),
            "latency": bool(_samples(text, "ray_visual_search_request_latency_ms_bucket")),
            "shard latency": shards("shard_search_latency_ms_count") == {"0", "1"},
            "candidates": bool(_samples(text, "ray_visual_search_shard_candidates_count")),
            "version": shards("index_version") == {"0", "1"},
            "rows": bool(_samples(text, "ray_visual_search_index_rows")),
            "memory": bool(_samples(text, "ray_visual_search_index_memory_bytes")),
            "delta": bool(_samples(text, "ray_visual_search_delta_rows")),
        }
        missing[:] = sorted(k for k, ok in have.items() if not ok)
        return None if missing else text

    missing: list[str] = []
    try:
        text = wait_for(exported, 60, "our metrics in Ray's Prometheus export", interval_s=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}; still missing: {missing}") from None
    search_ok = [
        s
        for s in _samples(text, "ray_visual_search_requests_total")
        if s.get("endpoint") == "/search" and s.get("status") == "200"
    ]
    assert all(s.get("deployment") == "Ingress" for s in search_ok)  # Serve's own tags are on


def test_request_id_follows_a_request_into_the_json_logs(head, deployed):
    request_id = f"vs-test-{time.time_ns()}"
    response = deployed.client.post(
        "/search", json={"vector": [0.0, 1.0] + [0.0] * 1278}, headers={"x-request-id": request_id}
    )
    assert response.status_code == 200
    assert response.headers.get("x-request-id") == request_id

    def logged() -> dict[str, list[dict]] | None:
        found: dict[str, list[dict]] = {}
        for path in (head.logs_dir / "serve").glob("replica_*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if request_id not in line:
                    continue
                record = json.loads(line)  # JSON encoding: every line one object
                deployment = record["deployment"].rsplit("_", 1)[-1]  # "<app>_<deployment>"
                found.setdefault(deployment, []).append(record)
        have_shard = any(name.startswith("ShardSearcher") for name in found)
        return found if "Ingress" in found and have_shard else None

    found = wait_for(logged, 30, f"log lines with request id {request_id}")
    ours = [r for r in found["Ingress"] if r.get("endpoint") == "/search"]
    assert ours and ours[0]["status"] == 200 and ours[0]["latency_ms"] > 0
    assert all(r["request_id"] == request_id for rows in found.values() for r in rows)


# Series exported only after an event this module does not cause (a shard left out of an answer,
# the canary's queue overflowing or a recomputation failing): the board must still read them,
# by the names the code defines.
UNTRIGGERED = {
    "visual_search_partial_answers",
    "visual_search_shards_missing",
    "visual_search_canary_dropped",
    "visual_search_canary_failed",
}


def test_the_grafana_board_reads_exactly_the_series_the_app_exports(head, deployed):
    """After searches, a forced rebuild (then GC) and the fixture's embed job: every series the
    board reads is in the scrape (or defined and untriggered), and every series the app defines,
    the embed job's included, is on the board."""
    defined = app_series()  # from serve.metrics.SERIES and pipelines.job_metrics.SERIES
    assert UNTRIGGERED <= set(defined)
    vector = [0.0, 0.0, 1.0] + [0.0] * 1277
    for _ in range(4):
        assert deployed.client.post("/search", json={"vector": vector}).status_code == 200
    rebuild = deployed.client.post(
        "/admin/rebuild", params={"force": "true"}, headers={"x-api-key": API_KEY}
    )
    assert rebuild.status_code == 202, rebuild.text
    wanted = {n for name, names in defined.items() if name not in UNTRIGGERED for n in names}
    missing: list[str] = []

    def scraped() -> set[str] | None:
        try:
            text = httpx.get(head.metrics_url, timeout=10).text
        except httpx.TransportError:
            return None
        have = set(parse_scrape(text, prefix="ray_visual_search_").series)
        missing[:] = sorted(wanted - have)
        return None if missing else have

    try:
        have = wait_for(scraped, 120, "every triggered series in the scrape", interval_s=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}; still missing: {missing}") from None
    known = set().union(*defined.values())
    assert have <= known, f"exported but not in the code's lists: {sorted(have - known)}"
    on_board = board_series(load_board())
    assert on_board <= known, f"the board reads series nobody exports: {sorted(on_board - known)}"
    unseen = on_board - have
    assert unseen <= {n for name in UNTRIGGERED for n in defined[name]}, sorted(unseen)
    off_board = sorted(name for name, names in defined.items() if not names & on_board)
    assert not off_board, f"series the app exports that the board leaves out: {off_board}"
