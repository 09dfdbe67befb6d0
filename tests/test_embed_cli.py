"""The embedding job as users run it: the CLI killed half-way and re-run.

The job starts Ray processes of its own in a new session (process group) with its own temp dir,
and the test stops exactly those (see ``harness.ray_head``). ``ray job submit`` of the job is in
``tests/test_cluster_ops.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import embed_samples as samples
from harness.ray_head import processes_of, ray_env, stop_processes
from harness.stores import read_store
from index.rows.sharding import uri_id
from pipelines.embed import run_job
from pipelines.embed_config import EmbedJobConfig

ROOT = Path(__file__).resolve().parents[1]


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
