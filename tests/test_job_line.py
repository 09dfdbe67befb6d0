"""The README's job line as a newcomer types it, on a Ray started without activating the venv.

``ray job submit --working-dir . -- python pipelines/embed.py ...`` runs ``python`` from the PATH
``ray start`` had on the head. Started as ``.venv/bin/ray start --head`` (no ``source
.venv/bin/activate``), that is whatever Python comes first on PATH; here a stand-in that lacks
the project, as a system or pyenv Python does (the venv's own interpreter with site-packages
off, ``-S``). The job must stop at once with exit 2 and say how to fix it
(``pipelines/job_python.py``), not die in an import; and the fix the message gives, a runtime
environment whose PATH leads to the venv, must make the documented build job run. The activated
case, the README's own order, is what ``tests/test_cluster_ops.py`` runs.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from harness.ray_head import VENV_BIN, RayHead, ray_env
from harness.stores import write_store
from harness.synthetic import gaussian_mixture, synthetic_rows
from index.storage.manifest import load_manifest

pytestmark = pytest.mark.slow


def newest_job(head: RayHead):
    """The head's most recently submitted job (``ray job submit`` waited for it to end)."""
    jobs = JobSubmissionClient(head.dashboard_url).list_jobs()
    return max(jobs, key=lambda job: job.start_time or 0)


@pytest.fixture(scope="module")
def bare_head(tmp_path_factory):
    """A head started by ``.venv/bin/ray`` from a shell whose ``python`` lacks the project."""
    bare = tmp_path_factory.mktemp("bare-bin")
    python = bare / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    path = f"{bare}{os.pathsep}{ray_env(activated=False)['PATH']}"
    head = RayHead(
        tmp_path_factory.mktemp("rb", numbered=True), num_cpus=2, activated=False,
        env_extra={"PATH": path},
    ).start()  # fmt: skip
    try:
        yield head
    finally:
        head.stop()


def test_a_job_under_a_python_without_the_project_says_how_to_fix_it(bare_head, tmp_path):
    log = bare_head.submit(
        "python", "pipelines/embed.py", "--input", str(tmp_path), "--store", str(tmp_path / "s"),
        check=False, timeout_s=180,
    )  # fmt: skip
    assert "which lacks numpy, pyarrow" in log and "No module named" not in log, log[-3000:]
    job = newest_job(bare_head)
    assert job.status == JobStatus.FAILED and "exit code 2" in job.message, job
    assert "source .venv/bin/activate && ray stop && ray start --head" in log
    assert not (tmp_path / "s").exists()  # nothing was written


def test_the_runtime_environment_the_message_gives_runs_the_job(bare_head, tmp_path):
    ids, uris = synthetic_rows(600)
    store = write_store(tmp_path / "store", ids, uris, gaussian_mixture(600, 32, seed=3), 2)
    fix = json.dumps({"env_vars": {"PATH": f"{VENV_BIN}:${{PATH}}"}})
    log = bare_head.submit(
        "python", "pipelines/build_index.py", "--store", str(tmp_path / "store"),
        options=("--runtime-env-json", fix), timeout_s=300,
    )  # fmt: skip
    assert newest_job(bare_head).status == JobStatus.SUCCEEDED, log[-3000:]
    shards = load_manifest(store).shards
    assert sorted(shards) == [0, 1] and all(s.version == 1 for s in shards.values()), shards
    assert sum(s.count for s in shards.values()) == len(ids)
