"""Fixtures shared by the suite: the test data folders and one real local Ray per session.

The photos, ANN files and weights come from the shared data folder ``../shared/data``
(``VISUAL_SEARCH_DATA`` elsewhere) where it holds them, else from folders generated from what a
fresh clone has (``harness.data_folder``: scikit-image's photos, seeded vectors and weights), so
no test skips for missing data; the session's header says which was used, and its summary
counts any test that skipped for missing data (none should).

Ray here binds to 127.0.0.1 only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and token auth is off
for the throwaway clusters tests start (see shared/RAY-HERE.md).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from harness.data_folder import KINDS, data_folder, shared_root
from pipelines.local_ray import init_local_ray, use_local_ray_env

use_local_ray_env()

USED: dict[str, str] = {}  # kind -> "shared <path>" / "generated <path>", as the fixtures chose
MISSING_DATA = re.compile(r"missing data|shared data .* is missing")


def require_installed(path: Path) -> Path:
    """Skip when a tool (a browser, a package) is absent on a developer box; fail in CI."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is not installed in CI")
        pytest.skip(f"not installed: {path}")
    return path


def _data(kind: str) -> Path:
    found = data_folder(kind)
    USED[kind] = f"{found.source} {found.path}"
    return found.path


@pytest.fixture(scope="session")
def caltech_dir() -> Path:
    """Caltech-101's layout: ``101_ObjectCategories/<class>/*.jpg``, ``train.txt``/``test.txt``."""
    return _data("photos")


@pytest.fixture(scope="session")
def ann_dir() -> Path:
    """``caltech101-mnv2-1280-angular.hdf5`` and ``sift5k-128-euclidean.hdf5``."""
    return _data("ann")


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """``mobilenet_v2-imagenet-features.pth``: torchvision ``features.*`` keys."""
    return _data("weights")


def pytest_report_header(config) -> str:
    shared = shared_root()
    found = [kind for kind, sub in KINDS.items() if (shared / sub).is_dir()]
    where = ", ".join(found) if found else "none of photos, ann, weights"
    return f"test data: shared folder {shared} holds {where}; the rest is generated on first use"


# Modules that take a minute or more, longest first (from the suite's own --durations list). They
# are collected first, so that run in parallel (``-n 2``, pytest-xdist, each module on one
# worker) the suite does not end on one of them while the other worker idles.
HEAVY_FIRST = (
    "test_fake_cluster",
    "test_freshness_http",
    "test_openapi_fuzz",
    "test_histories",
    "test_faults",
    "test_cluster_ops",
    "test_cli",
    "test_serve_demo",
    "test_metadata_http",
    "test_embed_cli",
    "test_shaping_http",
    "test_s3_end_to_end",
    "test_colocated",
    "test_text_search",
    "test_backbones",
)


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        name = item.module.__name__.rpartition(".")[2] if item.module else ""
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order


def pytest_sessionfinish(session) -> None:
    """On an xdist worker: hand the data folders it used to the controller's summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["test_data_used"] = dict(USED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    USED.update(getattr(node, "workeroutput", {}).get("test_data_used", {}))


def pytest_terminal_summary(terminalreporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = [str(r.longrepr[2]) if isinstance(r.longrepr, tuple) else "" for r in skipped]
    missing = sum(bool(MISSING_DATA.search(reason)) for reason in reasons)
    used = "; ".join(f"{kind}: {USED[kind]}" for kind in sorted(USED)) or "none used"
    terminalreporter.write_line(f"test data: {used}")
    terminalreporter.write_line(
        f"tests skipped for missing data: {missing} (of {len(skipped)} skipped)"
    )


@pytest.fixture(scope="session")
def scratch_root():
    """A short-pathed scratch folder (Ray's unix socket paths must stay under 107 bytes)."""
    path = tempfile.mkdtemp(prefix="vs-", dir="/tmp")
    os.environ["TMPDIR"] = path  # the dashboard's pymp-* folders land here, not in /tmp
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(scratch_root):
    """One in-process local Ray for the session, 4 logical CPUs on 2 cores (avoids starvation).
    Its metrics reach the Prometheus export every 2 s (Ray's default: 10 s), so the tests that
    read a gauge there wait seconds, not tens of seconds."""
    os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
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
