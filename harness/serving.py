"""The Serve app of a ``ServeConfig`` in this process, on a 127.0.0.1 port.

What every test app and Serve benchmark does first (Ray must be initialised): start Serve on a
loopback port, run the app graph, and take it down afterwards whatever happened.

``keep_serve=True`` (the tests' apps) deletes only the application at the end and keeps Serve's
controller and proxy running for the next app of the same Ray session, on the same port: about
5 s of start and 1 s of shutdown saved per app on 2 cores, where the suite deploys a dozen.
Without it (the benchmarks), Serve is shut down after the block, as before.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipelines.local_ray import free_port
from serve.config import ServeConfig

# the Serve instance this process started and keeps between apps: {"gcs": address, "port": n}
_kept: dict = {}


@dataclass
class Served:
    url: str  # http://127.0.0.1:<port>
    port: int
    start_s: float  # how long ``serve.run`` took (every deployment up)


def _controller_alive() -> bool:
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    except ValueError:
        return False
    return True


def serve_port(port: int | None = None, keep_serve: bool = False) -> int:
    """Start Serve on ``port`` (a free one by default) and return its port; with ``keep_serve``,
    the Serve this process keeps in the current Ray session is reused when it runs (and ``port``
    is unset or the same)."""
    import ray
    from ray import serve as ray_serve

    gcs = ray.get_runtime_context().gcs_address
    kept = _kept.get("gcs") == gcs and _controller_alive()
    if kept and keep_serve and port in (None, _kept["port"]):
        return _kept["port"]
    if kept:  # another port, or a caller that wants its own Serve: start again
        ray_serve.shutdown()
    _kept.clear()
    port = port or free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    if keep_serve:
        _kept.update(gcs=gcs, port=port)
    return port


@contextlib.contextmanager
def serving(
    config: ServeConfig, port: int | None = None, keep_serve: bool = False
) -> Iterator[Served]:
    """Serve ``config``'s app at ``/`` until the block ends (module docstring: ``keep_serve``)."""
    # Ray and Serve read settings from the environment when imported: imported when used, after
    # the caller (``init_local_ray``, a Serve mode) has set them
    from ray import serve as ray_serve

    from serve.app import build_app

    port = serve_port(port, keep_serve)
    try:
        t = time.perf_counter()
        ray_serve.run(build_app(config), name=config.app_name, route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", port, time.perf_counter() - t)
    finally:
        if keep_serve and _kept:
            ray_serve.delete(config.app_name)
        else:
            _kept.clear()
            ray_serve.shutdown()
