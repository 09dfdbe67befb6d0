"""A Ray started on this one machine: loopback only, no token file, no telemetry; free ports.

Ray binds to the machine's external address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set
for every ``ray`` command, driver and worker, and Ray 2.60 turns token auth on for local clusters
(see shared/RAY-HERE.md). The demo, the tests and the benchmarks start throwaway local clusters;
they take these settings from here, before ``ray.init`` / ``ray start``. A cluster made by
``ray up`` does not use them.
"""

from __future__ import annotations

import os
import socket

LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind the GCS, raylet and dashboard to 127.0.0.1
    "RAY_AUTH_MODE": "disabled",  # a throwaway local cluster: no ~/.ray/auth_token
    "RAY_USAGE_STATS_ENABLED": "0",
}


def use_local_ray_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the defaults in ``env`` (``os.environ`` when None) without overriding what is set;
    returns ``env``. Call before Ray starts: its processes read them at start-up."""
    target = os.environ if env is None else env
    for key, value in LOCAL_RAY_ENV.items():
        target.setdefault(key, value)
    return target


def init_local_ray(temp_dir: str | os.PathLike[str] | None, num_cpus: int = 4):
    """Start an in-process local Ray (the demo's, a test session's, a benchmark's) with its own
    temp dir, no dashboard and no worker logs on the driver. More logical CPUs than cores keeps
    fractional actors and tasks from starving each other on 2 cores. Returns the ``ray`` module."""
    use_local_ray_env()
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=None if temp_dir is None else str(temp_dir),
        log_to_driver=False,
    )
    return ray


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test's or a benchmark's server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
