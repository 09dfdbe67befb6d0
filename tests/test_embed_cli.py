"""The embedding job as users run it: the CLI killed half-way and re-run, and ``ray job submit``.

Both start Ray processes of their own in a new session (process group) with their own temp dir,
and stop exactly those: ``ray stop`` would also stop the session's ``ray_local`` cluster and any
other Ray on the machine. The temp dir appears in the command line of the cluster's processes,
which lets the tests prove that nothing of theirs is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from index.sharding import uri_id
from pipelines.embed import run_job
from pipelines.embed_config import EmbedJobConfig
from tests import embed_samples as samples
from tests.test_embed_job import read_store

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` / `ray` = this venv's
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            time.sleep(0.2)
        if not processes_of(pgid, marker, known):
            return
    left = [(p.pid, " ".join(p.cmdline())[:100]) for p in processes_of(pgid, marker, known)]
    pytest.fail(f"processes of the test's Ray survived SIGKILL: {left}")


def count_rows(root: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in root.glob("embeddings/*/part-*.parquet"))


@pytest.mark.slow
def test_killed_job_rerun_ends_with_every_input_exactly_once(
    ray_local, caltech_dir, tmp_path, scratch_root
):
    photos = samples.caltech_subset(caltech_dir, 48, per_class=1)
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    root = tmp_path / "store"
    ray_tmp = str(scratch_root / "kill")  # short: Ray's socket paths must stay < 108 bytes
    cmd = [sys.executable, "pipelines/embed.py", str(listing), "--store", str(root)]
    cmd += ["--batch-size", "4", "--part-rows", "4", "--ray-temp-dir", ray_tmp]
    log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen(
        cmd, cwd=ROOT, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not list(root.glob("embeddings/*/part-*.parquet")):
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no Parquet part appeared within 180 s"
            time.sleep(0.05)
        # The whole job at once, as a lost machine would: the driver, its local Ray, its actors.
        everything = processes_of(job.pid, ray_tmp)
        os.killpg(job.pid, signal.SIGKILL)
        for proc in everything:
            try:
                proc.kill()
            except psutil.Error:
                pass
        job.wait(timeout=30)
        stop_processes(job.pid, ray_tmp, grace_s=0.0, known={p.pid for p in everything})
    finally:
        if job.poll() is None:
            stop_processes(job.pid, ray_tmp, grace_s=0.0)
        log.close()
    killed_at = count_rows(root)
    assert 0 < killed_at < len(photos), killed_at

    summary = run_job(
        EmbedJobConfig(input=[str(listing)], store=str(root), batch_size=16, actors=2)
    )
    assert summary.skipped_present == killed_at
    assert summary.embedded == len(photos) - killed_at and summary.errors == 0
    rows, _ = read_store(root)
    assert sorted(rows["uri"]) == sorted(str(p) for p in photos)  # each exactly once
    assert sorted(rows["id"]) == sorted(uri_id(str(p)) for p in photos)


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(ray_local, caltech_dir, tmp_path, scratch_root):
    photos = samples.link_images(samples.caltech_subset(caltech_dir, 40), tmp_path / "photos")
    root = tmp_path / "store"
    ray_tmp = str(scratch_root / "head")
    dashboard = free_port()
    env = ray_env()
    start = [
        "ray", "start", "--head", "--num-cpus=4", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={ray_tmp}", "--include-dashboard=true",
    ]  # fmt: skip
    head = subprocess.Popen(
        start,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its daemons inherit this process group: we stop only them
    )
    try:
        out, _ = head.communicate(timeout=120)
        assert head.returncode == 0, out[-3000:]
        submit = [
            "ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
            "--working-dir", ".", "--",
            "python", "pipelines/embed.py", str(tmp_path / "photos"), "--store", str(root),
            "--batch-size", "8", "--actors", "2",
        ]  # fmt: skip
        done = subprocess.run(
            submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        assert "embedded 40 images (0 skipped as already present), 0 errors" in output
        assert "succeeded" in output
    finally:
        stop_processes(head.pid, ray_tmp)
    rows, _ = read_store(root)
    assert sorted(rows["uri"]) == sorted(str(p) for p in photos)
    # the session's in-process cluster was not touched by stopping ours
    assert ray_local.get(ray_local.put(7)) == 7
