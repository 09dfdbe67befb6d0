"""Closed-loop load, for the benchmarks that measure latency and QPS the same way.

``run_load`` makes ``n`` calls from ``concurrency`` threads, each thread sending its next
request when its last one answered (the load generator shares the machine's cores with the
server, as it does on a 2-core box); ``summarise`` turns the latencies into percentiles and QPS.
``ThreadClients`` gives each thread its own keep-alive ``httpx.Client``, ``HttpClient`` is
the JSON vector query every Serve benchmark sends (it keeps the server's ``took_ms``), and
``post_searches`` sends given requests (JSON bodies or image uploads) once each.
"""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import numpy as np


def summarise(latencies_s: list[float], wall_s: float) -> dict:
    """Requests, p50/p90/p99 and mean latency (ms) and QPS over ``wall_s``."""
    ms = np.asarray(latencies_s) * 1000
    return {
        "requests": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "qps": round(len(ms) / wall_s, 1),
    }


def single_query_p50(search, queries: np.ndarray, n: int = 200) -> float:
    """Median ms of ``search(q[None, :])`` over the first ``n`` queries, one at a time."""
    times = []
    for q in queries[:n]:
        t = time.perf_counter()
        search(q[None, :])
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1000, 3)


def run_load(
    call, n_requests: int, concurrency: int, loadavg: bool = False, errors_ok: bool = False
) -> tuple[dict, dict]:
    """``call(i) -> result`` from ``concurrency`` threads, ``n_requests`` in all: the latency
    summary (with this process's CPU per request and, with ``loadavg``, the machine's 1-minute
    load average before and after: others' work on a shared box) and ``{i: result}``. With
    ``errors_ok`` a call that raises is counted in ``errors`` (its result None, its latency kept:
    an overloaded server's 503 after its deadline is part of the tail), not fatal."""
    load_before = os.getloadavg()[0]
    latencies: list[float] = []
    results: dict[int, object] = {}
    errors: list[int] = []
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t, out = time.perf_counter(), None
            try:
                out = call(i)
            except Exception:
                if not errors_ok:
                    raise
                errors.append(i)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                results[i] = out

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    stats = summarise(latencies, wall)
    if errors_ok:
        stats["errors"] = len(errors)
    stats["client_cpu_s_per_request_ms"] = round((time.process_time() - cpu0) / n_requests * 1e3, 3)
    if loadavg:
        stats["loadavg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return stats, results


class ThreadClients:
    """One keep-alive ``httpx.Client`` per calling thread (``get()``), all closed by
    ``close()``; ``kwargs`` are the clients' (``base_url``, ``timeout``...)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.local = threading.local()
        self.made: list[httpx.Client] = []

    def get(self) -> httpx.Client:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = httpx.Client(**self.kwargs)
            self.made.append(client)
        return client

    def close(self) -> None:
        for client in self.made:
            client.close()


def post_searches(
    base_url: str,
    requests: list[dict],
    params: dict | None = None,
    concurrency: int = 1,
    warm: int = 0,
    loadavg: bool = False,
) -> tuple[list[dict], dict]:
    """Each request (``httpx`` keyword arguments: ``json=`` a body or ``files=`` an upload) to
    ``POST /search`` with ``params``, once, from ``concurrency`` threads after ``warm`` untimed
    ones: the answers' bodies in order, and ``run_load``'s timing."""
    clients = ThreadClients(base_url=base_url, timeout=120)

    def call(i: int) -> dict:
        r = clients.get().post("/search", params=params, **requests[i])
        r.raise_for_status()
        return r.json()

    try:
        for i in range(min(warm, len(requests))):
            call(i)
        timing, answers = run_load(call, len(requests), concurrency, loadavg=loadavg)
    finally:
        clients.close()
    return [answers[i] for i in range(len(requests))], timing


class HttpClient:
    """JSON vector queries (``k``, plus ``extra`` in every body) against one ``/search`` URL on
    keep-alive connections (one per client thread); remembers the server's ``took_ms`` of each
    answer. A partial answer is an error here."""

    def __init__(self, url: str, queries: np.ndarray, extra: dict | None = None, k: int = 10):
        self.url = url
        self.bodies = [
            json.dumps({"vector": q.tolist(), "k": k, **(extra or {})}).encode() for q in queries
        ]
        self.clients = ThreadClients(timeout=30)
        self.server_ms: list[float] = []

    def __call__(self, i: int) -> list[str]:
        r = self.clients.get().post(
            self.url,
            content=self.bodies[i % len(self.bodies)],
            headers={"content-type": "application/json"},
        )
        r.raise_for_status()
        body = r.json()
        if body["partial"]:
            raise RuntimeError(f"partial answer: {body['missing_shards']}")
        self.server_ms.append(body["took_ms"])
        return [h["id"] for h in body["results"]]
