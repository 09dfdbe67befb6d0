"""Fixtures shared by the suite: the shared data folder and one real local Ray per session.

Ray here binds to 127.0.0.1 only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and token auth is off
for the throwaway clusters tests start (see shared/RAY-HERE.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pipelines.local_ray import init_local_ray, use_local_ray_env

use_local_ray_env()

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("VISUAL_SEARCH_DATA", ROOT.parent / "shared" / "data"))
CALTECH = DATA_DIR / "images" / "caltech101"
ANN_DIR = DATA_DIR / "ann"
WEIGHTS_DIR = DATA_DIR / "weights"


def require_data(path: Path) -> Path:
    """Skip when the shared data is absent on a developer box; never skip in CI."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared data {path} is missing in CI")
        pytest.skip(f"shared data {path} is missing")
    return path


@pytest.fixture(scope="session")
def caltech_dir() -> Path:
    return require_data(CALTECH)


@pytest.fixture(scope="session")
def ann_dir() -> Path:
    return require_data(ANN_DIR)


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    return require_data(WEIGHTS_DIR)


@pytest.fixture(scope="session")
def scratch_root():
    """A short-pathed scratch folder (Ray's unix socket paths must stay under 107 bytes)."""
    path = tempfile.mkdtemp(prefix="vs-", dir="/tmp")
    os.environ["TMPDIR"] = path  # the dashboard's pymp-* folders land here, not in /tmp
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(scratch_root):
    """One in-process local Ray for the session, 4 logical CPUs on 2 cores (avoids starvation)."""
    ray = init_local_ray(scratch_root / "ray", num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the session (``harness.s3``)."""
    from harness.s3 import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_store_uri(s3_server) -> str:
    """A store root in a bucket of its own: ``s3://<bucket>/store``."""
    return f"{s3_server.new_bucket()}/store"
