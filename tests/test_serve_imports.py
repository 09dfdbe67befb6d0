"""Each serving process imports only what it runs: torch only in the query embedder.

The ingress and searcher replicas, the HTTP layer, the query planner and the serve config are
imported in a fresh interpreter each, and must leave ``torch`` out of ``sys.modules`` (it costs a
replica ~1.5 s and ~600 MiB for nothing). Their peak RSS is printed (``-s``), to compare with the
embedder's module, which does import torch. ``pyproject.toml``'s import contract says the same
statically (``lint-imports``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIGHT = [
    "serve.deployments.ingress",
    "serve.deployments.searcher",
    "serve.http.fastapi_app",
    "serve.http.parse",
    "serve.http.openapi",
    "serve.http.thumbnails",
    "serve.planner",
    "serve.config",
    "embedding",
]
PROBE = """
import importlib, json, resource, sys, time
start = time.perf_counter()
importlib.import_module(sys.argv[1])
print(json.dumps({
    "torch": "torch" in sys.modules,
    "seconds": round(time.perf_counter() - start, 2),
    "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
}))
"""


def imported(module: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", LIGHT)
def test_module_imports_without_torch(module):
    found = imported(module)
    print(f"\nimport {module}: {found['rss_mib']} MiB RSS, {found['seconds']} s")
    assert not found["torch"], f"import {module} loaded torch"


def test_the_query_embedder_is_the_one_that_loads_torch():
    found = imported("serve.deployments.embedder")
    print(f"\nimport serve.deployments.embedder: {found['rss_mib']} MiB RSS, {found['seconds']} s")
    assert found["torch"]
