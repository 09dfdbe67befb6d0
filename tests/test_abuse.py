"""Abuse by writers and anonymous callers, without Ray (review 9d94e46, section 2).

- **Stored-URI SSRF** (2.1): a thumbnail reads a row's uri only under ``thumbnail_roots``, checked
  on every read: ``/dev/zero``, a FIFO, a socket, a symlink or ``..`` out of a root, a path
  outside the roots, ``http://169.254.169.254/...``, another bucket, a chained URL are refused
  before anything is opened; a slow source is given up after ``thumbnail_timeout_s`` without
  holding up the event loop; thumbnails decode with the anonymous limits.
- **CSRF on open writes** (2.2): with ``open_writes`` and no key, a write from a browser must be
  same-origin and sent to an IP address or localhost (DNS rebinding); non-browser clients and
  keyed apps are unaffected.
- **Anonymous cost caps** (2.3): ``k``, filter nodes and the shaping pool are capped for callers
  without the key (a 422 naming the cap; the key lifts it), the OpenAPI document states the
  caps, and the shaping arithmetic runs in a worker thread, off the event loop.

The same rules run over real HTTP in ``test_abuse_http.py``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import embed_samples as samples
from index.query.filters import MAX_NODES
from index.query.shaping import DEDUP_THRESHOLD
from serve import planner as planner_module
from serve.config import MAX_K, ConfigError, ServeConfig
from serve.http import openapi
from serve.http import thumbnails as thumbs
from serve.http.errors import ApiError
from serve.http.limits import limits_for
from serve.http.parse import ParsedQuery, resolve_metadata
from serve.http.security import authorize_write
from serve.http.thumbnails import Sources, ThumbnailCache, thumbnail_response
from serve.http.validate import validate_params
from tests.test_planner import FakeGroup, params, planner_of, unit

DIM = 16


def _jpeg(path: Path, size=(320, 200)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    """A root with a photo, a FIFO, a socket and links out of it; a photo outside it."""
    root = tmp_path / "catalogue"
    root.mkdir()
    outside = _jpeg(tmp_path / "private.jpg")
    os.mkfifo(root / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.jpg"))
    (root / "link-out.jpg").symlink_to(outside)
    (root / "link-dev.jpg").symlink_to("/dev/zero")
    yield {"root": root, "photo": _jpeg(root / "photo.jpg"), "outside": outside}
    sock.close()


@pytest.fixture
def opened(monkeypatch):
    """Every path ``os.open`` and ``fsspec.open`` were asked to open during the test."""
    seen: list[str] = []
    real_open, real_fsspec = os.open, thumbs.fsspec.open

    def os_open(path, *args, **kwargs):
        seen.append(str(path))
        return real_open(path, *args, **kwargs)

    def fsspec_open(uri, *args, **kwargs):
        seen.append(str(uri))
        return real_fsspec(uri, *args, **kwargs)

    monkeypatch.setattr(thumbs.os, "open", os_open)
    monkeypatch.setattr(thumbs.fsspec, "open", fsspec_open)
    return seen


def _refused(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert (info.value.status, info.value.error) == (404, "image_unavailable"), info.value
    return info.value


def test_thumbnails_read_only_regular_files_under_the_roots(tree, opened):
    root, photo = tree["root"], tree["photo"]
    sources = Sources([str(root), "s3://bucket/images"])
    for uri in (str(photo), photo.as_uri(), f"file://localhost{photo}"):
        assert sources.allows(uri) and sources.read(uri, 1 << 20) == photo.read_bytes()
    assert opened == [str(photo)] * 3
    opened.clear()
    hostile = [
        "/dev/zero",
        "file:///dev/zero",
        "/dev/stdin",
        "/proc/self/environ",
        "/etc/passwd",
        str(tree["outside"]),  # a real photo, outside the roots
        f"{root}/../private.jpg",  # .. out of a root
        f"file://{root}/..%2Fprivate.jpg",  # the same, percent-encoded
        f"{root}2/photo.jpg",  # a sibling folder that shares the root's name as a prefix
        "file://other-host/srv/x.jpg",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "https://example.com/x.jpg",
        "ftp://example.com/x.jpg",
        "s3://other-bucket/x.jpg",
        "s3://bucket/images2/x.jpg",
        "s3://bucket/images/../secret/x.jpg",
        "s3://bucket/images/x.jpg?versionId=1",
        "simplecache::s3://bucket/images/x.jpg",
        "upload:abc",
        "photo.jpg",
    ]
    for uri in hostile:
        assert not sources.allows(uri), uri
        _refused(sources.read, uri, 1 << 20)
    # under a root by name, but not a regular file there (a FIFO's open would block for good)
    # or a link out of the roots: refused from stat/realpath, never opened
    for name in ("fifo.jpg", "sock.jpg", "link-out.jpg", "link-dev.jpg"):
        assert sources.allows(str(root / name))  # by name: the read decides
        _refused(sources.read, str(root / name), 1 << 20)
    assert opened == []
    # no roots (the default): nothing is read at all
    nothing = Sources([])
    assert not nothing.allows(str(photo)) and not nothing.allows("s3://bucket/images/x.jpg")
    _refused(nothing.read, str(photo), 1 << 20)
    assert opened == []
    # a file over the byte cap is refused, not decoded
    assert "over 100 bytes" in _refused(sources.read, str(photo), 100).detail


def test_a_fifo_answers_at_once_and_a_slow_source_times_out_off_the_event_loop(tree, monkeypatch):
    cache = ThumbnailCache()
    anon = limits_for(ServeConfig(store="x"), keyed=False)
    sources = Sources([str(tree["root"]), "s3://bucket/images"], timeout_s=0.3)
    release = threading.Event()
    monkeypatch.setattr(thumbs, "_remote", lambda uri, n: release.wait(30) and b"")

    async def scenario():
        start = time.monotonic()
        with pytest.raises(ApiError, match="regular file"):
            fifo = {"id": "f", "uri": str(tree["root"] / "fifo.jpg")}
            await thumbnail_response(fifo, None, sources, anon, cache)
        assert time.monotonic() - start < 5
        # a source that never answers: the request gives up; the loop keeps serving meanwhile
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        start = time.monotonic()
        with pytest.raises(ApiError, match="took over 0.3 s"):
            slow = {"id": "s", "uri": "s3://bucket/images/slow.jpg"}
            await thumbnail_response(slow, None, sources, anon, cache)
        assert 0.25 < time.monotonic() - start < 5 and ticks >= 5
        tick.cancel()
        good = {"id": "p", "uri": str(tree["photo"])}
        response = await thumbnail_response(good, None, sources, anon, cache)
        assert response.status_code == 200 and response.media_type == "image/jpeg"

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_thumbnails_decode_with_the_anonymous_pixel_cap(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(samples.bomb_png(4500))  # 20 MP: over the anonymous 16 MP, under 50 MP
    config = ServeConfig(store="x", thumbnail_roots=[str(tmp_path)]).validate()
    sources = Sources(config.thumbnail_roots)
    data = sources.read(str(big), 1 << 20)
    anon, keyed = limits_for(config, keyed=False), limits_for(config, keyed=True)
    assert thumbs.make_thumbnail(data, keyed).jpeg  # what every caller got before
    assert "decompression_bomb" in _refused(thumbs.make_thumbnail, data, anon).detail


def test_thumbnail_roots_are_checked_when_the_config_is():
    config = ServeConfig(
        store="x", thumbnail_roots=["/srv/photos/", "file:///data/x/../y", "s3://bucket/a/b"]
    ).validate()
    assert config.thumbnail_roots == ["/srv/photos", "/data/y", "s3://bucket/a/b/"]
    assert ServeConfig.from_dict({"thumbnail_roots": "/a, s3://b/c"}).thumbnail_roots == [
        "/a",
        "s3://b/c",
    ]
    assert ServeConfig(store="x").validate().thumbnail_roots == []  # the default: none
    for bad, says in (
        ("http://cdn.example.com/images", "never http://"),
        ("https://169.254.169.254/", "never https://"),
        ("relative/dir", "not an absolute path"),
        ("/", "whole or a system tree"),
        ("/dev", "whole or a system tree"),
        ("/proc/self", "whole or a system tree"),
        ("s3://", "not a plain"),
        ("s3://bucket/../other", "not a plain"),
        ("simplecache::s3://bucket/x", "not an absolute path"),
    ):
        with pytest.raises(ConfigError, match=says):
            ServeConfig(store="x", thumbnail_roots=[bad]).validate()
    with pytest.raises(ConfigError, match="thumbnail_timeout_s"):
        ServeConfig(store="x", thumbnail_timeout_s=0).validate()


# ---- 2.2: CSRF on open writes ---------------------------------------------------------------
def _write_refusal(config: ServeConfig, headers: dict) -> str | None:
    try:
        authorize_write(headers, config)
    except ApiError as e:
        assert e.status in (401, 403) and e.detail
        return e.error
    return None


def test_open_writes_refuse_cross_site_and_rebound_browser_writes():
    opened = ServeConfig(store="x", open_writes=True).validate()
    host = {"host": "127.0.0.1:8000"}
    allowed = [
        host,  # curl, the Python client: no browser headers
        {**host, "origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"},  # /docs
        {**host, "sec-fetch-site": "none"},  # typed into the address bar
        {"host": "localhost:8000", "origin": "http://localhost:8000"},
        {"host": "[::1]:8000", "origin": "http://[::1]:8000", "sec-fetch-site": "same-origin"},
        {"host": "127.0.0.1", "origin": "http://127.0.0.1:80"},
    ]
    for headers in allowed:
        assert _write_refusal(opened, headers) is None, headers
    refused = [
        {**host, "origin": "https://evil.example", "sec-fetch-site": "cross-site"},
        {**host, "sec-fetch-site": "cross-site"},  # a form post from another site
        {**host, "sec-fetch-site": "same-site"},  # another port of this host: another app
        {**host, "origin": "http://evil.example"},  # a browser without Fetch Metadata
        {**host, "origin": "http://127.0.0.1:3000"},  # another local app's page
        {**host, "origin": "null"},  # a sandboxed frame, a data: URL
        # DNS rebinding: the attacker's name now points at 127.0.0.1, so it is "same-origin"
        {
            "host": "evil.example:8000",
            "origin": "http://evil.example:8000",
            "sec-fetch-site": "same-origin",
        },
    ]
    for headers in refused:
        assert _write_refusal(opened, headers) == "cross_site_write", headers
    # a keyed app: the key decides, whatever the page (a page cannot read the key)
    keyed = ServeConfig(store="x", api_key="k").validate()
    cross = {**host, "origin": "https://evil.example", "sec-fetch-site": "cross-site"}
    assert _write_refusal(keyed, {**cross, "x-api-key": "k"}) is None
    assert _write_refusal(keyed, cross) == "unauthorized"
    assert _write_refusal(ServeConfig(store="x").validate(), cross) == "writes_need_api_key"


# ---- 2.3: anonymous cost caps ------------------------------------------------------------------
def test_anonymous_k_filter_and_pool_are_capped_and_the_key_lifts_them():
    config = ServeConfig(store="x", api_key="k").validate()
    anon, keyed = limits_for(config, keyed=False), limits_for(config, keyed=True)
    assert (anon.max_k, anon.max_filter_nodes, anon.max_shape_pool) == (100, 16, 200)
    assert (keyed.max_k, keyed.max_filter_nodes, keyed.max_shape_pool) == (MAX_K, MAX_NODES, MAX_K)
    with pytest.raises(ApiError) as info:
        validate_params({"k": 101}, anon)
    assert (info.value.status, info.value.error) == (422, "k_out_of_range")
    assert "1..100" in info.value.detail and "API key" in info.value.detail
    assert validate_params({"k": 1000}, keyed).k == 1000
    assert validate_params({"k": 100}, anon).max_pool == 200
    # a default k above the cap is cut to it: a caller who names no k is never refused
    low = limits_for(ServeConfig(store="x", default_k=500, anon_max_k=50).validate(), False)
    assert validate_params({}, low).k == 50

    schema = {"color": "string"}
    leaves = [{"field": "color", "eq": str(i)} for i in range(16)]
    for limits, body, error in (
        (anon, {"or": leaves}, "filter_too_large"),  # 17 nodes
        (anon, {"not": {"not": {"or": leaves[:15]}}}, "filter_too_large"),  # 18 nodes
        (anon, {"or": leaves[:15]}, None),  # 16 nodes
        (keyed, {"or": leaves}, None),
    ):
        query = ParsedQuery("vector", validate_params({}, limits), raw_filter=body, limits=limits)
        if error is None:
            assert resolve_metadata(query, schema).params.filter is not None
            continue
        with pytest.raises(ApiError) as info:
            resolve_metadata(query, schema)
        assert (info.value.status, info.value.error) == (422, error)
        assert "at most 16 nodes" in info.value.detail and "API key" in info.value.detail


def test_the_openapi_document_states_the_anonymous_caps():
    config = ServeConfig(store="x", api_key="k").validate()
    ctx = openapi.OpenApiContext(dim=4, metadata={"color": "string"}, api_key=True)
    ctx.limits = limits_for(config, keyed=False)
    doc = openapi.document({"paths": {"/search": {"post": {}}}}, ctx)
    query = {p["name"]: p["schema"] for p in doc["paths"]["/search"]["post"]["parameters"]}
    assert query["k"]["maximum"] == 100 and "API key" in query["k"]["description"]
    assert "200 merged hits" in query["dedup"]["description"]
    body = doc["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["k"]["maximum"] == 100
    assert "at most 16 nodes" in doc["components"]["schemas"]["Filter"]["description"]


def test_shaping_runs_in_a_worker_thread_and_its_pool_is_capped(monkeypatch):
    threads: list[threading.Thread] = []
    real = planner_module.shape_hits

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(planner_module, "shape_hits", recording)
    eye = np.eye(DIM, dtype=np.float32)
    dups = {f"dup-{i:04d}": (0, eye[0]) for i in range(1000)}  # one photo, 1000 copies
    others = {f"other-{j}": (1, eye[j]) for j in range(1, 11)}
    query = unit(eye[0] + 0.1 * eye[1:11].sum(axis=0))

    def search(max_pool: int):
        a, b = FakeGroup(dups), FakeGroup(others)
        shaped = params(k=3, dedup=DEDUP_THRESHOLD)
        shaped.max_pool = max_pool

        async def go():
            return threading.current_thread(), await planner_of([([0], a), ([1], b)]).search(
                query, shaped, ()
            )

        loop_thread, answer = asyncio.run(go())
        return loop_thread, answer, [call["k"] for call in a.searches]

    loop_thread, answer, asked = search(max_pool=MAX_K)  # keyed: the pool regrows x4 to 1000
    assert asked == [23, 92, 368, 1000]
    assert threads and all(t is not loop_thread for t in threads)  # never on the event loop
    loop_thread, answer, asked = search(max_pool=50)  # an anonymous cap of 50
    assert asked == [23, 50] and len(answer.results(3)) == 1  # fewer groups, not more work


def test_the_demo_names_its_images_folders_as_thumbnail_roots(tmp_path):
    from visual_search.demo import thumbnail_roots_of

    images = tmp_path / "images"
    images.mkdir()
    photo = _jpeg(images / "a.jpg")
    assert thumbnail_roots_of(str(images)) == [str(images.resolve())]
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{photo}\ns3://bucket/x/y.jpg\nhttps://example.com/z.jpg\n")
    roots = thumbnail_roots_of(str(listing))
    assert roots == sorted([str(images.resolve()), "s3://bucket/x/"])  # never a web root
    sources = Sources(ServeConfig(store="x", thumbnail_roots=roots).validate().thumbnail_roots)
    assert sources.allows(photo.resolve().as_uri()) and sources.allows("s3://bucket/x/y.jpg")
    assert not sources.allows("https://example.com/z.jpg")
