"""Abuse by writers and anonymous callers over real HTTP (review 9d94e46, section 2).

One Serve app on 127.0.0.1 set up as the demo is: no key, ``open_writes``, thumbnails under two
roots (the catalogue's photo folder and an uploads folder holding a FIFO, a 20 MP image and a
link out of it). Through its HTTP port:

- rows whose stored uri is ``/dev/zero``, a FIFO, a link or a path out of the roots,
  ``http://169.254.169.254/...``, a loopback web server's URL or another bucket are added, and
  their thumbnails are 404 ``image_unavailable`` at once; nothing is read (the web server sees
  no request), the FIFO blocks no thread, and the replica keeps serving searches and real
  thumbnails; a 20 MP image is refused by the anonymous pixel cap;
- a browser write from another site's page (``Origin``/``Sec-Fetch-Site``) or under a rebound
  host name is 403 ``cross_site_write`` and writes nothing; same-origin and non-browser writes
  work;
- an anonymous ``k`` or filter over its cap is a 422 naming the cap.

The rules themselves are pinned without Ray in ``test_abuse.py``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ray import serve

from harness import embed_samples as samples
from harness.polling import wait_for
from harness.serve_app import RunningApp, app_config, make_store
from harness.serving import serve_port
from index.rows.sharding import uri_id
from index.storage.manifest import evolve_metadata
from serve.app import build_app

pytestmark = pytest.mark.slow


class _Counting(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    """A web server on 127.0.0.1 that records every request (it must see none)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    work = scratch_root / "abuse-http"
    uploads = work / "uploads"
    uploads.mkdir(parents=True)
    store, paths, vectors = make_store(work / "store", caltech_dir, 2, classes=2, per_class=4)
    private = work / "private.jpg"  # a photo the server can read, outside the roots
    private.write_bytes(paths[0].read_bytes())
    os.mkfifo(uploads / "fifo.jpg")
    (uploads / "link-out.jpg").symlink_to(private)
    (uploads / "big.png").write_bytes(samples.bomb_png(4500))  # 20 MP > the anonymous 16 MP
    evolve_metadata(store, {"color": "string"})  # for the filter caps
    config = app_config(
        store.uri,
        api_key="",
        open_writes=True,  # the demo's setting on loopback
        thumbnail_roots=[str(paths[0].parent.parent), str(uploads)],
        thumbnail_timeout_s=5.0,
    )
    # not harness.serve_app.running_app: its clients send the key, and this app has none
    port = serve_port(keep_serve=True)  # the session's Serve (harness.serving)
    try:
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        running = RunningApp(f"http://127.0.0.1:{port}", port, store, paths, vectors, config)
        with running.client(10, keyed=False) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, 120, "/readyz 200")
        running.extra.update(uploads=uploads, private=private)
        yield running
    finally:
        serve.delete(config.app_name)


def _vector(app) -> list[float]:
    return app.vectors[app.paths[0].resolve().as_uri()].tolist()


def _thumbnail_of(client, row_id: str):
    return client.get(f"/images/{row_id}/thumbnail", timeout=20)


def test_stored_uris_outside_the_roots_are_never_read(app, web):
    uploads, private = app.extra["uploads"], app.extra["private"]
    web_url = f"http://127.0.0.1:{web.server_address[1]}/photo.jpg"
    hostile = {  # uri -> "thumbnail" in the POST answer (under the roots by name)
        "/dev/zero": False,
        "file:///dev/zero": False,
        str(private): False,
        f"{uploads}/../private.jpg": False,
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/": False,
        web_url: False,
        "s3://other-bucket/x.jpg": False,
        str(uploads / "fifo.jpg"): True,  # by name; the read finds no regular file
        str(uploads / "link-out.jpg"): True,  # by name; its real path is outside
        str(uploads / "big.png"): True,  # readable, but over the anonymous pixel cap
    }
    added = {}
    with app.client(keyed=False) as client:
        for uri in hostile:  # any uri is stored: it is the row's name
            r = client.post("/images", json={"vector": _vector(app), "uri": uri})
            assert r.status_code == 201, r.text
            added[uri] = r.json()
        ids = {uri: body["id"] for uri, body in added.items()}
        for uri, row_id in ids.items():
            r = _thumbnail_of(client, row_id)
            assert r.status_code == 404, (uri, r.status_code)
            assert r.json()["error"] == "image_unavailable", (uri, r.text)
        # the POST answer said which uris lie under the roots
        assert {uri: body.get("thumbnail") for uri, body in added.items()} == hostile
        big = _thumbnail_of(client, ids[str(uploads / "big.png")]).json()["detail"]
        assert "decompression_bomb" in big
        # many FIFO reads at once: none blocks a thread, so none waits behind another
        fifo = ids[str(uploads / "fifo.jpg")]
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda _: _thumbnail_of(client, fifo).status_code, range(12)))
        assert codes == [404] * 12
        # the worker is healthy: it searches, and serves a real photo's thumbnail
        assert web.RequestHandlerClass.hits == []  # no SSRF: the web server saw nothing
        assert client.get("/healthz").status_code == 200
        r = client.post("/search", json={"vector": _vector(app), "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        photo = app.paths[1].resolve().as_uri()
        r = _thumbnail_of(client, uri_id(photo))
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        for row_id in ids.values():
            assert client.delete(f"/images/{row_id}").status_code == 200


def test_open_writes_take_same_origin_writes_only(app):
    here = f"127.0.0.1:{app.port}"
    cross = {"origin": "https://evil.example", "sec-fetch-site": "cross-site"}
    rebound = {  # DNS rebinding: the attacker's name resolves to 127.0.0.1
        "host": f"evil.example:{app.port}",
        "origin": f"http://evil.example:{app.port}",
        "sec-fetch-site": "same-origin",
    }
    photo = app.paths[0].read_bytes()
    with app.client(keyed=False) as client:
        for headers in (cross, {"sec-fetch-site": "cross-site"}, {"origin": "null"}, rebound):
            # the CORS-simple form post a page can send anywhere: a multipart image upload
            r = client.post(
                "/images",
                headers=headers,
                files={"file": ("x.jpg", photo, "image/jpeg")},
                data={"id": "csrf-1"},
            )
            assert (r.status_code, r.json()["error"]) == (403, "cross_site_write"), r.text
            r = client.post("/admin/rebuild", params={"force": "true"}, headers=headers)
            assert (r.status_code, r.json()["error"]) == (403, "cross_site_write"), r.text
            r = client.delete(f"/images/{uri_id(app.paths[0].resolve().as_uri())}", headers=headers)
            assert r.status_code == 403, r.text
        assert client.get("/images/csrf-1").json()["error"] == "unknown_id"  # nothing written
        # this app's own pages (/docs) and clients that are not browsers write as before
        same = {"origin": f"http://{here}", "sec-fetch-site": "same-origin"}
        for headers in (same, {}):
            body = {"vector": _vector(app), "id": "own-page"}
            r = client.post("/images", json=body, headers=headers)
            assert r.status_code == 201, r.text
            assert client.delete("/images/own-page", headers=headers).status_code == 200


def test_anonymous_k_and_filter_caps_name_themselves(app):
    query = {"vector": _vector(app)}
    leaves = [{"field": "color", "eq": str(i)} for i in range(16)]
    with app.client(keyed=False) as client:
        r = client.post("/search", json={**query, "k": 101})
        assert (r.status_code, r.json()["error"]) == (422, "k_out_of_range"), r.text
        assert "1..100" in r.json()["detail"] and "API key" in r.json()["detail"]
        r = client.post("/search", json={**query, "k": 100, "dedup": True})
        assert r.status_code == 200, r.text
        r = client.post("/search", json={**query, "filter": {"or": leaves}})  # 17 nodes
        assert (r.status_code, r.json()["error"]) == (422, "filter_too_large"), r.text
        assert "at most 16 nodes" in r.json()["detail"]
        r = client.post("/search", json={**query, "filter": {"or": leaves[:15]}})
        assert r.status_code == 200 and r.json()["results"] == [], r.text  # no row has a color
        doc = client.get("/openapi.json").json()
        k = next(p for p in doc["paths"]["/search"]["post"]["parameters"] if p["name"] == "k")
        assert k["schema"]["maximum"] == 100
