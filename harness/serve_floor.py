"""Serve's own cost of a query on this box: a no-op app of our app's shape, the floor under ours.

    .venv/bin/python -m harness.serve_floor <spec.json>     (what ``measure_floor`` runs)

An ingress (FastAPI on Serve, in the default Serve mode: HAProxy on Serve's port, throughput
mode) reads a JSON body with a ``vector``, makes it a float32 array, calls one no-op deployment
with it over gRPC (the search path's transport, ``ServeConfig.handle_transport``) and answers
ten fixed hits as JSON. No search, no rerank, no planner: what it costs a query (p50 at c=1, CPU
ms per query over every Ray process and HAProxy at c=16, both from ``wrk``) is what no work of
ours can go under on this box. ``benchmarks/routing.py`` and ``benchmarks/peers.py`` measure it
in the same run as their figures and quote them against it.
(No ``from __future__ import annotations``: FastAPI reads the route's annotations as objects.)
"""

import json
import sys
from pathlib import Path

import numpy as np

from harness.samplers import CpuSampler
from harness.serve_runs import SERVER_ROLES, cpu_per_query, run_in_mode
from harness.wrk_load import run_wrk, wrk_path
from serve.local import DEFAULT_MODE


def measure_floor(
    workdir: Path, dim: int, seconds: float = 10.0, concurrency=(1, 16), queries: int = 200
) -> dict:
    """The no-op app's ``wrk`` figures and server CPU per query at each ``concurrency`` level,
    in a fresh process in the default Serve mode; ``{}`` without ``wrk``."""
    if wrk_path() is None:
        return {}
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((queries, dim)).astype(np.float32)
    bodies = [json.dumps({"vector": [round(float(x), 6) for x in v], "k": 10}) for v in vectors]
    out = workdir / "serve-floor.json"
    spec = workdir / "serve-floor-spec.json"
    spec.write_text(
        json.dumps(
            {
                "out": str(out),
                "ray_dir": str(workdir / "ray"),
                "bodies": bodies,
                "seconds": seconds,
                "concurrency": list(concurrency),
            }
        )
    )
    run_in_mode("harness.serve_floor", spec, DEFAULT_MODE)
    return {"mode": DEFAULT_MODE, **json.loads(out.read_text())}


def _app():
    """The no-op app (built in the child: Serve reads its mode from the environment on import)."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()
    hits = [{"id": f"{i:016x}", "uri": f"floor://{i}", "score": 0.5, "shard": 0} for i in range(10)]

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
    class NoSearch:
        def search(self, vector: np.ndarray) -> list[dict]:
            return hits

    @serve.deployment(max_ongoing_requests=256)
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, searcher) -> None:
            self.searcher = searcher.options(_by_reference=False)

        @api.post("/search")
        async def search(self, request: Request) -> dict:
            body = await request.json()
            vector = np.asarray(body["vector"], dtype=np.float32)
            return {"results": await self.searcher.search.remote(vector)}

    return FloorIngress.bind(NoSearch.bind())


def worker(spec: dict) -> None:
    """Serve the no-op app on a free port, load it with ``wrk`` at each level; write figures."""
    from ray import serve

    from harness.polling import wait_for
    from harness.serving import serve_port
    from pipelines.local_ray import init_local_ray

    ray = init_local_ray(spec["ray_dir"], num_cpus=4)
    try:
        port = serve_port()
        serve.run(_app(), name="serve-floor", route_prefix="/")
        url = f"http://127.0.0.1:{port}/search"
        wait_for(lambda: _answers(url, spec["bodies"][0]), 120, "the no-op app's first answer")
        run_wrk(url, spec["bodies"], 1, 2)  # warm-up
        figures = {}
        for c in spec["concurrency"]:
            with CpuSampler(SERVER_ROLES, "driver", interval_s=0.5) as cpu:
                loaded = run_wrk(url, spec["bodies"], c, spec["seconds"])
            figures[str(c)] = {**loaded, **cpu_per_query(cpu, loaded["requests"])}
            print(f"serve floor c={c}: {figures[str(c)]}", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
    Path(spec["out"]).write_text(json.dumps(figures))


def _answers(url: str, body: str) -> bool:
    import httpx

    try:
        return httpx.post(url, content=body, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))
