"""Safe defaults for a port anyone can reach (``serve.http.security``), without Ray.

Writes and admin calls need the key unless the config opens them; anonymous callers get lower
caps on nprobe, candidates and image pixels, with a refusal that says the key lifts them; and
they never see server-side error text (file paths, hosts, exception messages). The same rules
run over HTTP in ``test_bad_input.py``.
"""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from harness import embed_samples as samples
from serve.config import ConfigError, ServeConfig
from serve.http.crop import image_crop
from serve.http.errors import ApiError, error_kind, public_error, redact
from serve.http.fastapi_app import create_app
from serve.http.limits import limits_for
from serve.http.page import add_page_routes
from serve.http.security import authorize_write, is_keyed
from serve.http.validate import validate_params

KEY = "s3cret-key"


def _refused(config: ServeConfig, headers: dict) -> tuple[int, str, str] | None:
    try:
        authorize_write(headers, config)
    except ApiError as e:
        return e.status, e.error, e.detail
    return None


def test_writes_are_closed_without_a_key_unless_opened():
    config = ServeConfig(store="x").validate()
    assert (config.api_key, config.open_writes) == ("", False)  # the defaults
    status, error, detail = _refused(config, {})
    assert (status, error) == (403, "writes_need_api_key")
    assert "api_key" in detail and "open_writes: true" in detail  # names both ways out
    assert _refused(config, {"x-api-key": "anything"})[:2] == (403, "writes_need_api_key")
    opened = ServeConfig(store="x", open_writes=True).validate()
    assert _refused(opened, {}) is None
    read_only = ServeConfig(store="x", open_writes=True, writes=False).validate()
    assert _refused(read_only, {})[:2] == (403, "writes_disabled")


def test_a_key_is_needed_when_set_and_checked_exactly():
    config = ServeConfig(store="x", api_key=KEY).validate()
    assert _refused(config, {})[:2] == (401, "unauthorized")
    assert _refused(config, {"x-api-key": KEY + "x"})[:2] == (401, "unauthorized")
    assert _refused(config, {"authorization": f"Basic {KEY}"})[:2] == (401, "unauthorized")
    assert _refused(config, {"x-api-key": KEY}) is None
    assert _refused(config, {"authorization": f"Bearer {KEY}"}) is None
    assert is_keyed({"x-api-key": KEY}, KEY) and not is_keyed({"x-api-key": ""}, "")
    with pytest.raises(ConfigError, match="open_writes"):
        ServeConfig(store="x", api_key=KEY, open_writes=True).validate()
    with pytest.raises(ConfigError, match="anon_max_nprobe"):
        ServeConfig(store="x", anon_max_nprobe=0).validate()


def test_from_the_environment_the_key_closes_writes_to_others(monkeypatch):
    monkeypatch.setenv("VISUAL_SEARCH_API_KEY", KEY)
    config = ServeConfig.from_dict({"store": "x"}).validate()
    assert config.api_key == KEY and _refused(config, {})[:2] == (401, "unauthorized")


def test_anonymous_callers_get_lower_caps_and_are_told_the_key_lifts_them():
    config = ServeConfig(store="x", api_key=KEY).validate()
    anon, keyed = limits_for(config, keyed=False), limits_for(config, keyed=True)
    assert (anon.max_nprobe, anon.max_candidates, anon.max_pixels) == (256, 1000, 16_000_000)
    assert (keyed.max_nprobe, keyed.max_candidates, keyed.max_pixels) == (65536, 10000, 50_000_000)
    for raw, error in (({"nprobe": 1000}, "nprobe_out_of_range"), ({"candidates": 5000}, None)):
        error = error or "candidates_out_of_range"
        with pytest.raises(ApiError) as info:
            validate_params(raw, anon)
        assert (info.value.status, info.value.error) == (422, error)
        assert "API key" in info.value.detail
        validate_params(raw, keyed)  # the key lifts the cap
    # a 20 MP image: refused from its header for anonymous callers, embedded for keyed ones
    png = samples.bomb_png(4500)
    with pytest.raises(ApiError) as info:
        image_crop(png, 224, anon)
    assert (info.value.status, info.value.error) == (413, "decompression_bomb")
    assert "API key" in info.value.detail
    assert image_crop(png, 224, keyed).shape == (224, 224, 3)
    # an operator's lower max_* wins over a higher anonymous cap
    low = limits_for(ServeConfig(store="x", max_nprobe=64).validate(), keyed=False)
    assert low.max_nprobe == 64


def test_server_side_error_text_is_cut_to_its_kind():
    assert error_kind("error: RayActorError: The actor died on /tmp/ray/x, 10.0.0.5") == (
        "error: RayActorError"
    )
    assert error_kind("IndexLoadError: /store/indexes/shard=00000/v3/index.faiss: bad") == (
        "IndexLoadError"
    )
    assert error_kind("timeout") == "timeout" and error_kind(None) is None
    stats = {
        "shards": [
            {"shard": 0, "reload_error": "IndexLoadError: /data/store/x", "lease_error": None},
            {"shard": 1, "error": "error: TimeoutError: waited 1s on host a.b"},
        ],
        "embedder": {"error": "error: RayActorError: died at /home/u"},
        "memory_bytes": 12,
    }
    shown = redact(stats)
    assert "/" not in str(shown) and shown["memory_bytes"] == 12
    assert shown["shards"][0]["reload_error"] == "IndexLoadError"
    body = ApiError(
        503, "no_shard_answered", "none of 2 shards answered within 1000 ms", {
            "missing_shards": [{"shard": 0, "reason": "error: RayActorError: at /tmp/x"}]
        }
    ).body()  # fmt: skip
    public = public_error(body)
    assert public["error"] == "no_shard_answered" and "/" not in str(public)
    assert public["missing_shards"] == [{"shard": 0, "reason": "error: RayActorError"}]
    own = ApiError(422, "k_out_of_range", "k must be in 1..1000, got 0").body()
    assert public_error(own) == own  # about the caller's own input: kept


def _app() -> FastAPI:
    app = create_app()

    @app.get("/boom")
    async def boom(request: Request):
        request.state.keyed = request.headers.get("x-api-key") == KEY  # as the ingress marks it
        raise RuntimeError("cannot open /srv/store/_manifests/000007.json")

    @app.get("/embed")
    async def embed(request: Request):
        request.state.keyed = request.headers.get("x-api-key") == KEY
        raise ApiError(503, "embedder_unavailable", "error: RayActorError: died on /tmp/ray/s")

    return app


def test_error_bodies_hide_exception_text_from_anonymous_callers(caplog):
    client = TestClient(_app(), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        r = client.get("/boom", headers={"x-request-id": "req-42"})
    assert r.status_code == 500 and r.json()["error"] == "internal"
    assert "/srv" not in r.text and "RuntimeError" not in r.text and "req-42" in r.text
    assert "/srv/store" in caplog.text  # the operator finds it in the log
    r = client.get("/boom", headers={"x-api-key": KEY})
    assert r.status_code == 500 and "/srv/store" in r.json()["detail"]  # keyed: the details
    r = client.get("/embed")
    assert r.status_code == 503 and r.json()["error"] == "embedder_unavailable"
    assert "/tmp" not in r.text and "RayActorError" not in r.text
    assert "/tmp/ray" in client.get("/embed", headers={"x-api-key": KEY}).json()["detail"]


def test_the_search_page_and_only_its_own_assets_are_served():
    """``serve.http.page`` without Serve: the page and its two files (from ``serve/static/``,
    with the CSP), and a 404 JSON ``not_found`` for any other name."""
    app = create_app()
    add_page_routes(app)
    client = TestClient(app)
    page = client.get("/")
    assert page.status_code == 200 and "<base href=" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("search.js", "search.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.headers["etag"]
        assert client.get(f"/static/{name}", headers={"if-none-match": asset.headers["etag"]}
                          ).status_code == 304  # fmt: skip
    other = client.get("/static/..%2Fconfig.py")
    assert other.status_code == 404 and other.json()["error"] == "not_found"
