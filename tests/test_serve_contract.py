"""The serving contract without Ray: request validation, error mapping, config, scatter-gather.

The same rules are exercised over real HTTP in test_serve_http.py; these pin the edge cases
quickly (no Serve start-up), so each reason code is checked against its status here.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from harness import embed_samples as samples
from serve.config import ConfigError, DeploymentSettings, ServeConfig
from serve.http.crop import image_crop
from serve.http.errors import ApiError
from serve.http.limits import Limits
from serve.http.validate import validate_id, validate_params, validate_vector
from serve.scatter import gather_with_deadline

ROOT = Path(__file__).resolve().parents[1]
_ORIGINAL_THROUGHPUT_FLAG = os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED")


def _raises(status: int, error: str, fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    assert (info.value.status, info.value.error) == (status, error), info.value
    assert info.value.body()["detail"]
    return info.value


# ---- parameters ----------------------------------------------------------------------------------
def test_params_defaults_strings_and_ranges():
    limits = Limits(default_k=7, max_nprobe=64, max_candidates=100)
    p = validate_params({}, limits)
    assert (p.k, p.nprobe, p.rerank, p.candidates) == (7, None, True, None)
    p = validate_params({"k": "5", "nprobe": "8", "rerank": "false", "candidates": 50}, limits)
    assert (p.k, p.nprobe, p.rerank, p.candidates) == (5, 8, False, 50)
    assert validate_params({"k": 1000}, limits).k == 1000
    for bad in (0, -1, 1001, "1001"):
        _raises(422, "k_out_of_range", validate_params, {"k": bad}, limits)
    _raises(422, "nprobe_out_of_range", validate_params, {"nprobe": 65}, limits)
    _raises(422, "nprobe_out_of_range", validate_params, {"nprobe": 0}, limits)
    _raises(422, "candidates_out_of_range", validate_params, {"candidates": 101}, limits)
    for bad in ({"k": "abc"}, {"k": 2.5}, {"k": True}, {"rerank": "maybe"}, {"rerank": 3}):
        _raises(422, "invalid_parameter", validate_params, bad, limits)


# ---- vectors and ids -----------------------------------------------------------------------------
def test_vector_validation_names_each_problem():
    v = validate_vector([3.0, 4.0, 0.0], 3, normalise=True)
    assert v.dtype == np.float32 and np.allclose(v, [0.6, 0.8, 0.0])
    assert np.allclose(validate_vector([3, 4, 0], 3, normalise=False), [3, 4, 0])
    _raises(422, "wrong_vector_length", validate_vector, [1.0, 2.0], 3, True)
    _raises(422, "non_finite_vector", validate_vector, [1.0, math.nan, 0.0], 3, True)
    _raises(422, "non_finite_vector", validate_vector, [1.0, math.inf, 0.0], 3, True)
    _raises(422, "non_finite_vector", validate_vector, [1.0, 1e39, 0.0], 3, True)  # > float32 max
    _raises(422, "zero_vector", validate_vector, [0.0, 0.0, 0.0], 3, True)
    for bad in ("abc", [1.0, "x", 2.0], [[1.0], [2.0], [3.0]], [True, 1.0, 2.0], {"a": 1}):
        _raises(422, "invalid_vector", validate_vector, bad, 3, True)


def test_id_validation():
    assert validate_id("00ff") == "00ff"
    for bad in ("", 17, None, "x" * 257):
        _raises(422, "invalid_id", validate_id, bad)


# ---- images: every ImageError reason maps to its status -----------------------------------------
def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size=(300, 200)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_image_crop_and_error_statuses():
    limits = Limits(max_upload_bytes=1 << 20, max_pixels=1_000_000)
    crop = image_crop(_jpeg(), 224, limits)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    _raises(422, "empty", image_crop, b"", 224, limits)
    _raises(415, "not_an_image", image_crop, b"%PDF-1.4 hello, not a picture", 224, limits)
    _raises(422, "truncated", image_crop, _jpeg()[:2000], 224, limits)
    _raises(413, "too_large", image_crop, b"x" * ((1 << 20) + 1), 224, limits)
    # a 1-bit 2000x2000 PNG is a few hundred bytes; its 4M pixels pass the 1M limit
    bomb = _png((2000, 2000), "1")
    assert len(bomb) < 10_000
    _raises(413, "decompression_bomb", image_crop, bomb, 224, limits)


# ---- config --------------------------------------------------------------------------------------
def test_config_from_dict_env_and_strings(monkeypatch):
    monkeypatch.setenv("VISUAL_SEARCH_STORE", "/tmp/some-store")
    cfg = ServeConfig.from_dict({"shard_deadline_ms": "250", "searcher": {"num_replicas": "2"}})
    cfg.validate()
    assert cfg.store == "/tmp/some-store" and cfg.shard_deadline_ms == 250.0
    assert cfg.searcher.num_replicas == 2 and cfg.searcher.num_cpus == 0.25  # defaults kept
    assert cfg.embedder.num_gpus == "auto"
    with pytest.raises(ConfigError, match="unknown serve config keys: nprob"):
        ServeConfig.from_dict({"nprob": 3})
    with pytest.raises(ConfigError, match="unknown searcher settings"):
        ServeConfig.from_dict({"searcher": {"replicas": 3}})
    with pytest.raises(ConfigError, match="default_k"):
        ServeConfig(store="x", default_k=0).validate()
    with pytest.raises(ConfigError, match="shard_deadline_ms"):
        ServeConfig.from_dict({"store": "x", "shard_deadline_ms": 0}).validate()
    monkeypatch.delenv("VISUAL_SEARCH_STORE")
    with pytest.raises(ConfigError, match="no store"):
        ServeConfig().validate()


def test_deployment_options_fixed_autoscaled_and_gpu_auto():
    fixed = DeploymentSettings(num_replicas=2, num_cpus=0.5).deployment_options()
    assert fixed["num_replicas"] == 2 and fixed["ray_actor_options"]["num_cpus"] == 0.5
    assert "autoscaling_config" not in fixed
    auto = DeploymentSettings(min_replicas=1, max_replicas=4, num_gpus="auto")
    options = auto.deployment_options(cluster_gpus=0)
    assert "num_replicas" not in options
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["ray_actor_options"]["num_gpus"] == 0.0
    assert auto.deployment_options(cluster_gpus=2)["ray_actor_options"]["num_gpus"] == 1.0
    with pytest.raises(ConfigError):
        DeploymentSettings(min_replicas=3, max_replicas=2).validate("x")
    with pytest.raises(ConfigError):
        DeploymentSettings(min_replicas=1).validate("x")


def test_custom_resources_place_replicas_and_are_validated():
    cfg = ServeConfig.from_dict({"store": "/s", "searcher": {"resources": {"shard_host": 1}}})
    options = cfg.validate().searcher.deployment_options()
    assert options["ray_actor_options"]["resources"] == {"shard_host": 1}
    assert "resources" not in cfg.ingress.deployment_options()["ray_actor_options"]
    for bad, message in [
        ({"CPU": 1}, "with num_cpus"),
        ({"shard_host": -1}, "number >= 0"),
        ({"shard_host": "x"}, "number >= 0"),
        (["shard_host"], "mapping"),
    ]:
        with pytest.raises(ConfigError, match=message):
            DeploymentSettings(resources=bad).validate("searcher")
    with pytest.raises(ConfigError, match="log_encoding"):
        ServeConfig(store="/s", log_encoding="XML").validate()


def test_serve_deploy_config_is_valid_for_ray_and_for_our_builder():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)  # Ray's own validation of the file
    app = schema.applications[0]
    assert app.import_path == "serve.app:app_builder" and app.route_prefix == "/"
    cfg = ServeConfig.from_dict(app.args).validate()
    assert cfg.searcher.max_replicas == 2 and cfg.embedder.num_gpus == "auto"
    assert cfg.ingress.deployment_options()["autoscaling_config"]["min_replicas"] == 1


# ---- scatter-gather ------------------------------------------------------------------------------
def test_gather_keeps_answers_and_names_slow_and_failed_shards():
    async def answer(value, delay=0.0):
        await asyncio.sleep(delay)
        return value

    async def fail():
        raise RuntimeError("replica died")

    calls = {
        0: lambda: answer("a"),
        1: lambda: answer("b", delay=5.0),  # past the deadline
        2: fail,
        3: lambda: answer("d"),
    }
    gathered = asyncio.run(gather_with_deadline(calls, timeout_s=0.2))
    assert gathered.answers == {0: "a", 3: "d"}
    assert gathered.missing[1] == "timeout"
    assert gathered.missing[2].startswith("error: RuntimeError")
    assert gathered.took_ms < 2000  # the slow shard did not hold the answer back


def test_a_search_answer_over_grpcs_cap_is_asked_again_as_an_actor_task():
    """The gRPC transport's one fallback: an answer larger than the message cap (the real
    error grpc raises) is fetched again over the uncapped path; other errors are the shard's."""
    import grpc

    from serve.deployments.group_calls import search_over_grpc

    def rpc_error(code):
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "x")

    class Group:
        def __init__(self, outcome):
            self.outcome, self.calls = outcome, []
            self.search = self

        def remote(self, *args):
            self.calls.append(args)
            return self._answer()

        async def _answer(self):
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

    quick, slow = Group(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED)), Group({"ids": ["a"]})
    assert asyncio.run(search_over_grpc(quick, slow, "v", 10)) == {"ids": ["a"]}
    assert quick.calls == slow.calls == [("v", 10)]
    quick, slow = Group(rpc_error(grpc.StatusCode.UNAVAILABLE)), Group({"ids": ["a"]})
    with pytest.raises(grpc.aio.AioRpcError):  # a dead replica: the scatter names the shard
        asyncio.run(search_over_grpc(quick, slow, "v", 10))
    assert slow.calls == []
    fine = Group({"ids": ["b"]})
    assert asyncio.run(search_over_grpc(fine, slow, "v", 10)) == {"ids": ["b"]}
    assert slow.calls == []


def test_query_crop_is_the_batch_jobs_crop(caltech_dir):
    """Same bytes, same pixels: the query path and the embedding job prepare images alike."""
    import pyarrow as pa

    from pipelines.embed_stages import CROP, read_decode_batch

    files = samples.class_photos(caltech_dir)[:3] + samples.grey_photos(caltech_dir, 1)
    assert len(files) == 4 and Image.open(files[-1]).mode == "L"
    uris = [f.as_uri() for f in files]
    table = pa.table({"id": [str(i) for i in range(len(uris))], "uri": uris})
    out = read_decode_batch(
        table, image_size=224, resize_size=256, max_pixels=50_000_000, max_bytes=1 << 25
    )
    for i, f in enumerate(files):
        batch_crop = np.asarray(out[CROP][i].as_py(), np.uint8).reshape(224, 224, 3)
        np.testing.assert_array_equal(image_crop(f.read_bytes(), 224, Limits()), batch_crop)


def test_search_defaults_from_config_and_transport_choice():
    limits = Limits(default_k=5, default_nprobe=32, default_candidates=400)
    p = validate_params({}, limits)
    assert (p.k, p.nprobe, p.candidates) == (5, 32, 400)
    p = validate_params({"nprobe": 8, "candidates": 50}, limits)  # a request overrides them
    assert (p.nprobe, p.candidates) == (8, 50)
    ServeConfig(store="x", default_nprobe=16, default_candidates=400).validate()
    with pytest.raises(ConfigError, match="default_candidates"):
        ServeConfig(store="x", default_candidates=0).validate()
    with pytest.raises(ConfigError, match="handle_transport"):
        ServeConfig(store="x", handle_transport="carrier-pigeon").validate()
    assert ServeConfig.from_dict({"store": "x", "image_queries": "false"}).image_queries is False


def test_serve_modes_only_fill_unset_flags(monkeypatch):
    from serve.local import SERVE_MODES, set_serve_mode

    for key in SERVE_MODES["throughput"]:
        monkeypatch.setenv(key, "x")  # records the original state, restored after the test
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "7")
    set_serve_mode("throughput")
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "7"  # user's wins
    with pytest.raises(ValueError):
        set_serve_mode("warp-speed")


def test_serve_mode_flags_did_not_leak_into_the_session():
    # the Ray started for this session must run Serve as the environment asked, not as a test set
    assert os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == _ORIGINAL_THROUGHPUT_FLAG
