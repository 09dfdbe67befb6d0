"""The Serve app of a ``ServeConfig`` in this process, on a free 127.0.0.1 port.

What every test app and Serve benchmark does first (Ray must be initialised): start Serve on a
loopback port, run the app graph, and shut Serve down afterwards whatever happened.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipelines.local_ray import free_port
from serve.config import ServeConfig


@dataclass
class Served:
    url: str  # http://127.0.0.1:<port>
    port: int
    start_s: float  # how long ``serve.run`` took (every deployment up)


@contextlib.contextmanager
def serving(config: ServeConfig, port: int | None = None) -> Iterator[Served]:
    """Serve ``config``'s app at ``/`` on ``port`` (a free one by default) until the block ends."""
    # Ray and Serve read settings from the environment when imported: imported when used, after
    # the caller (``init_local_ray``, a Serve mode) has set them
    from ray import serve as ray_serve

    from serve.app import build_app

    port = port or free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        t = time.perf_counter()
        ray_serve.run(build_app(config), name=config.app_name, route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", port, time.perf_counter() - t)
    finally:
        ray_serve.shutdown()
