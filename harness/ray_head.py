"""A real ``ray start --head`` on 127.0.0.1 for tests, and stopping exactly what it started.

Tests that run the system the way users do (``ray job submit``, ``serve deploy``, Ray's
Prometheus export) need a cluster with a dashboard, not the session's in-process ``ray_local``.
The head runs in a new session (process group) with its own temp dir, and is stopped by those two
marks: ``ray stop`` would also stop ``ray_local`` and any other Ray on the machine. The temp dir
appears in the command line of the cluster's processes, which lets tests prove that nothing of
theirs is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from harness.polling import free_port
from pipelines.local_ray import LOCAL_RAY_ENV

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def ray_env(activated: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: with the project's venv activated (its ``python`` and
    ``ray`` first on ``PATH``), or not (``PATH`` without it, as after ``.venv/bin/ray``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(LOCAL_RAY_ENV)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != VENV_BIN]
    env["PATH"] = os.pathsep.join([str(VENV_BIN)] * activated + path)
    if activated:
        env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env.update(extra)
    return env


def processes_of(pgid: int, marker: str, known: set[int] = frozenset()) -> list[psutil.Process]:
    """Live processes of one Ray: its process group, its temp dir on their command line, their
    descendants (Ray workers call setsid and retitle themselves, so only parentage finds them),
    and the ``known`` pids seen earlier (orphans re-parented to init)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (
                proc.pid in known
                or os.getpgid(proc.pid) == pgid
                or marker in " ".join(proc.info["cmdline"] or ())
            ):
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True))
        except (psutil.Error, ProcessLookupError):
            continue
    alive = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def stop_processes(pgid: int, marker: str, grace_s: float = 3.0, known=frozenset()) -> None:
    """SIGTERM them all, SIGKILL what is left after ``grace_s``; fail if anything survives."""
    known = set(known) | {p.pid for p in processes_of(pgid, marker, known)}
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 15.0)):
        for proc in processes_of(pgid, marker, known):
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.monotonic() + wait_s
        while processes_of(pgid, marker, known) and time.monotonic() < deadline:
            time.sleep(0.2)  # pacing between checks, not synchronisation
        if not processes_of(pgid, marker, known):
            return
    left = [(p.pid, " ".join(p.cmdline())[:100]) for p in processes_of(pgid, marker, known)]
    pytest.fail(f"processes of the test's Ray survived SIGKILL: {left}")


@dataclass
class RayHead:
    """One ``ray start --head`` with a dashboard (jobs, ``serve deploy``) and a metrics port."""

    temp_dir: Path
    num_cpus: int = 4
    env_extra: dict[str, str] = field(default_factory=dict)
    dashboard_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    gcs_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)  # more `ray start` flags
    activated: bool = True  # started from a shell with the venv activated (ray_env)
    pid: int | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def env(self) -> dict[str, str]:
        return ray_env(self.activated, **self.env_extra)

    @property
    def logs_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def start(self) -> RayHead:
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", f"--num-cpus={self.num_cpus}",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={self.metrics_port}",
            f"--temp-dir={self.temp_dir}", "--include-dashboard=true", *self.extra_args,
        ]  # fmt: skip
        head = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its daemons inherit this process group: we stop only them
        )
        self.pid = head.pid
        out, _ = head.communicate(timeout=120)
        if head.returncode != 0:
            self.stop()
            pytest.fail(f"ray start --head failed: {out[-3000:]}")
        return self

    def run(
        self, args: list[str], timeout_s: float = 300, cwd: Path = ROOT, check: bool = True
    ) -> str:
        """A CLI command against this head (``ray job submit ...``, ``serve deploy ...``; ``ray``
        and ``serve`` are the venv's, typed by path when it is not activated); with ``check``,
        fails the test with the command's output unless it exits 0. Returns the output."""
        if args[0] in ("ray", "serve"):
            args = [str(VENV_BIN / args[0]), *args[1:]]
        done = subprocess.run(
            args, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        output = done.stdout + done.stderr
        if check:
            assert done.returncode == 0, f"{' '.join(args[:4])} ... failed:\n{output[-4000:]}"
        return output

    def submit(
        self, *job: str, timeout_s: float = 300, options: tuple[str, ...] = (), check=True
    ) -> str:
        """``ray job submit --working-dir . [options] -- <job>``: waits for the job and returns
        its log (``check``: fails the test unless the job succeeded)."""
        return self.run(
            ["ray", "job", "submit", "--address", self.dashboard_url, "--working-dir", "."]
            + [*options, "--", *job],
            timeout_s=timeout_s,
            check=check,
        )

    def stop(self) -> None:
        if self.pid is not None:
            stop_processes(self.pid, str(self.temp_dir))
