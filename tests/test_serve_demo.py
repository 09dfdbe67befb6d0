"""The README demo, as a user runs it (minus the install): a subprocess, its own local Ray."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from harness.polling import wait_for
from pipelines.local_ray import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_embeds_builds_serves_answers_and_stops_on_sigterm(scratch_root):
    """The demo as the README runs it (served, not ``--exit``): it embeds every catalogue image,
    builds both shards, answers the held-out queries (printed), then serves on its port behind
    Serve's HAProxy ingress (the default mode); SIGTERM stops it as Ctrl-C does: exit 0, and
    nothing (no HAProxy left behind) keeps the port. One run for all of it: each demo run starts
    its own local Ray and Serve (~40 s on 2 cores)."""
    workdir = scratch_root / "demo"
    port = free_port()
    log = scratch_root / "demo-serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "visual_search.demo", "--workdir", str(workdir)]
    cmd += ["--port", str(port)]
    cmd += ["--ray-temp-dir", str(scratch_root / "demo-ray")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: "serving; Ctrl-C to stop" in log.read_text() or proc.poll() is not None,
            420,
            "the demo to serve",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        out = log.read_text()
        assert "Serve mode: haproxy" in out
        _check_demo_output(out, workdir, port)
        reply = httpx.post(f"http://127.0.0.1:{port}/search", json={"id": "no-such-id"}, timeout=10)
        assert reply.status_code == 404 and reply.json()["error"] == "unknown_id"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "stopping" in log.read_text()

        def port_is_free() -> bool:
            """A new server could listen there (SO_REUSEADDR, as servers bind: the request
            above may leave the port's side of its connection in TIME_WAIT for a minute)."""
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    return False
                return True

        try:
            wait_for(port_is_free, 30, f"port {port} to be free after the demo stopped")
        except AssertionError as e:  # say who still listens there
            held = [
                (c.pid, c.status) for c in psutil.net_connections("tcp") if c.laddr.port == port
            ]
            raise AssertionError(f"{e}; sockets on the port (pid, state): {held}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _check_demo_output(out: str, workdir: Path, port: int) -> None:
    """What the demo printed before serving: every catalogue image embedded, both shards built,
    the held-out query answered by its own photo first, precision over the edits, the curl line
    and a deploy file."""
    assert re.search(r"embedded 153 images .* 0 errors", out), out[-3000:]
    assert re.search(r"built 2 shard\(s\) \(153 vectors\).*0 failed; versions 0:v1, 1:v1", out), (
        out[-3000:]
    )
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\S+)\s+\[(same photo|other)\]$", out, re.M)
    assert len(rows) == 5 and rows[0][4] == "same photo", out[-3000:]
    assert "chelsea_cat__" in rows[0][3]
    precision = float(re.search(r"precision@5 over 16 held-out edits.*: ([\d.]+)", out).group(1))
    assert precision >= 0.9
    assert f"curl -s -F file=@{workdir}/queries/chelsea_cat__query.jpg" in out
    assert f"http://127.0.0.1:{port}/search?k=5" in out
    assert (workdir / "serve_config.yaml").exists()
