"""Closed-loop load from ``wrk``, a C load generator, for latency tails the server is to blame for.

``closed_loop.run_load`` sends from Python threads in one process; on a 2-core box shared with
the server, 16 of them wait for the GIL and the CPU as well as for the server, and that wait is
in their latencies: at c=16 their p99 was 8x their p50 where ``wrk`` against the same server
saw 2.1-2.4x and the ingress's own ``took_ms`` 1.9-2.1x (200k x 256 in 4 shards, this box). The
benchmarks that quote a tail measure it here too, when ``wrk`` is installed (``apt-get install
wrk``; not needed by the tests).

``run_wrk`` posts the given JSON bodies in turn (each ``wrk`` thread cycles through all of them)
for ``duration_s`` at ``concurrency`` connections and parses ``--latency``'s percentiles.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)


def wrk_path() -> str | None:
    """The ``wrk`` on PATH, or None."""
    return shutil.which("wrk")


def lua_script(path: str, bodies: list[str]) -> str:
    """A wrk script that POSTs ``bodies`` to ``path`` in turn as JSON."""
    for body in bodies:
        if "]==]" in body:
            raise ValueError("a body contains the script's closing bracket ]==]")
    quoted = ",\n".join(f"[==[{body}]==]" for body in bodies)
    return (
        f"local bodies = {{\n{quoted}\n}}\n"
        "local i = 0\n"
        "local headers = {['Content-Type'] = 'application/json'}\n"
        "request = function()\n"
        "  i = i % #bodies + 1\n"
        f"  return wrk.format('POST', '{path}', headers, bodies[i])\n"
        "end\n"
    )


def parse_wrk(out: str, duration_s: float) -> dict:
    """``wrk --latency``'s report: p50/p75/p90/p99 ms, requests, QPS, non-2xx and socket errors."""
    found = {f"p{p}_ms": round(float(v) * UNITS_MS[u], 3) for p, v, u in PERCENTILE.findall(out)}
    if "p50_ms" not in found or "p99_ms" not in found:
        raise ValueError(f"no latency distribution in wrk's output:\n{out[-2000:]}")
    requests = re.search(r"(\d+) requests in", out)
    qps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        out)  # fmt: skip
    return {
        **found,
        "requests": int(requests.group(1)) if requests else 0,
        "qps": round(float(qps.group(1)), 1) if qps else 0.0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(map(int, sockets.groups())) if sockets else 0,
        "duration_s": duration_s,
        "load_generator": "wrk",
    }


def run_wrk(url: str, bodies: list[str], concurrency: int, duration_s: float = 20.0) -> dict:
    """``wrk`` at ``concurrency`` connections (2 threads, 1 for a single connection) POSTing
    ``bodies`` to ``url`` for ``duration_s``; ``parse_wrk``'s figures. Requires ``wrk``."""
    wrk = wrk_path()
    if wrk is None:
        raise FileNotFoundError("wrk is not installed (apt-get install wrk)")
    parts = urlsplit(url)
    with tempfile.TemporaryDirectory(prefix="vs-wrk-") as tmp:
        script = Path(tmp) / "bodies.lua"
        script.write_text(lua_script(parts.path or "/", bodies))
        threads = 1 if concurrency == 1 else 2
        done = subprocess.run(
            [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{duration_s:g}s", "--latency",
             "--timeout", "30s", "-s", str(script), f"{parts.scheme}://{parts.netloc}"],
            capture_output=True, text=True, timeout=duration_s + 120,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-2000:]}")
    return parse_wrk(done.stdout, duration_s)
