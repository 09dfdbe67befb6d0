"""A real Serve app on 127.0.0.1 for the reliability tests and the load benchmark.

``running_app`` starts the whole graph (Ingress -> QueryEmbedder, the ShardSearcher groups,
Rebuilder, RecallCanary) over a small store of real photos (``caltech_dir``) on a loopback port,
and deletes the app after; Serve itself stays up for the session's next app on the same port
(``harness.serving``, ``keep_serve``).
The app has an API key (``TEST_API_KEY``) and ``RunningApp.client()`` sends it, so the tests
write and read error details as an operator does; ``client(keyed=False)`` is an anonymous caller.
``serve_replicas`` lists the live Serve actors with their process ids straight from the GCS
actor table: the tests' local Ray runs without a dashboard, so ``ray.util.state`` (which asks the
dashboard) is not available there, and a restarted replica shows up as a new actor id and pid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness.polling import wait_for
from harness.serve_store import caltech_sample, write_caltech_store
from harness.serving import serving
from serve.config import DeploymentSettings, ServeConfig


@dataclass
class RunningApp:
    base_url: str
    port: int
    store: Any  # index.storage.store.Store
    paths: list[Path]
    vectors: dict[str, np.ndarray]  # uri -> the catalogue's vector
    config: ServeConfig
    extra: dict = field(default_factory=dict)

    def client(self, timeout: float = 60.0, keyed: bool = True) -> httpx.Client:
        key = self.config.api_key if keyed else ""  # an app with no key (open_writes): none
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)


TEST_API_KEY = "test-key-not-secret"


def ingress_settings(num_replicas: int = 1) -> DeploymentSettings:
    """The test app's Ingress: a small CPU share, quick health checks."""
    return DeploymentSettings(
        num_replicas=num_replicas,
        num_cpus=0.25,
        max_ongoing_requests=64,
        health_check_period_s=1.0,
        health_check_timeout_s=5.0,
    )


def app_config(store_uri: str, **overrides: Any) -> ServeConfig:
    """The test app's config: small CPU shares, quick health checks, quick manifest polling,
    and an API key (writes need one; ``RunningApp.client`` sends it).

    The shards are served as the default layout serves one box: one ``ShardSearcher0`` group
    holding them all (one process to start, not one per shard). Tests that kill one shard's
    replica pass ``shards_per_group=1`` (a deployment per shard)."""
    values: dict[str, Any] = {
        "store": store_uri,
        "api_key": TEST_API_KEY,
        "shard_deadline_ms": 1500,
        "embed_deadline_ms": 5000,
        "embed_threads": 1,
        "reload_interval_s": 0,
        "access_log": False,
        "shutdown_wait_s": 0.2,  # an idle replica of a deleted app stops at once
        "searcher": DeploymentSettings(
            num_cpus=0.25, health_check_period_s=1.0, health_check_timeout_s=5.0
        ),
        "embedder": DeploymentSettings(
            num_cpus=0.5, health_check_period_s=1.0, health_check_timeout_s=5.0
        ),
        "ingress": ingress_settings(),
    }
    values.update(overrides)
    return ServeConfig(**values)


def make_store(root: Path, caltech_dir: Path, num_shards: int, classes: int, per_class: int):
    paths = caltech_sample(caltech_dir, classes=classes, per_class=per_class)
    store, vectors = write_caltech_store(root, paths, num_shards)
    return store, paths, vectors


@contextlib.contextmanager
def running_app(
    store, paths: list[Path], vectors: dict[str, np.ndarray], **overrides: Any
) -> Iterator[RunningApp]:
    """Deploy the app over ``store`` (Ray must be initialised) and yield how to reach it."""
    config = app_config(store.uri, **overrides)
    with serving(config, keep_serve=True) as served:
        app = RunningApp(served.url, served.port, store, paths, vectors, config)
        with app.client(10) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, 120, "/readyz 200")
        yield app


# ---- the Serve actors and their processes -------------------------------------------------------
def serve_replicas(include_system: bool = False) -> list[dict]:
    """Live Serve actors: ``{"actor_id", "name", "deployment", "pid", "restarts"}``.

    ``deployment`` is the deployment name for replicas ("Ingress", "ShardSearcher0", ...) and
    "controller"/"proxy" for Serve's own actors (with ``include_system``).
    """
    from ray._private import state  # GCS actor table; the public state API needs a dashboard

    rows = []
    for actor_id, info in state.actors().items():
        name = info.get("Name") or ""
        if info.get("State") != "ALIVE":
            continue
        if name.startswith("SERVE_REPLICA::"):
            deployment = name.split("#")[1] if name.count("#") >= 2 else name
        elif include_system and name.startswith("SERVE_CONTROLLER"):
            deployment = "controller"
        elif include_system and name.startswith("SERVE_PROXY"):
            deployment = "proxy"
        else:
            continue
        rows.append(
            {
                "actor_id": actor_id,
                "name": name,
                "deployment": deployment,
                "pid": int(info.get("Pid") or 0),
                "restarts": int(info.get("NumRestarts") or 0),
            }
        )
    return sorted(rows, key=lambda r: (r["deployment"], r["name"]))


def replica_identity() -> dict[str, tuple[str, int]]:
    """deployment -> (actor id, pid) of each replica: any change means a replica restarted."""
    return {
        f"{r['deployment']}/{r['name']}": (r["actor_id"], r["pid"])
        for r in serve_replicas(include_system=True)
    }


def kill_replica(deployment: str) -> dict:
    """SIGKILL-equivalent death of the (single) replica of ``deployment``: ``ray.kill``.

    Serve's controller notices the dead actor and starts a replacement; returns the killed row.
    """
    import ray

    rows = [r for r in serve_replicas() if r["deployment"] == deployment]
    assert len(rows) == 1, rows
    ray.kill(ray.get_actor(rows[0]["name"], namespace="serve"), no_restart=False)
    return rows[0]
