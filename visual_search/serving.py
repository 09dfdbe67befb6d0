"""Ray and Serve for a command that serves: start them, deploy the app, serve until Ctrl-C or
SIGTERM, and stop them in order. One place for ``visual-search serve`` and the demo, so both
start Ray the same way (loopback, the Serve mode's flags set before Ray starts) and both leave
nothing running (Serve and its HAProxy, then Ray) however they stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time


def start_ray(serve_mode: str, temp_dir=None, num_cpus: int | None = None, address: str = ""):
    """Connect to ``address``, or start a local Ray on 127.0.0.1 in ``serve_mode``.

    Locally, logical CPUs above the physical count: an embedding job's decode tasks, its actor
    and the Serve replicas (fractional) would otherwise wait on each other on a small box.
    """
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
        return ray
    from pipelines.local_ray import init_local_ray
    from serve.local import set_serve_mode

    set_serve_mode(serve_mode)  # before Ray starts: its processes read the flags
    cores = len(os.sched_getaffinity(0))
    return init_local_ray(temp_dir, num_cpus=num_cpus or max(4, cores))


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM stops the command the way Ctrl-C does. Call after ``ray.init``, which installs
    its own handler, so Serve and Ray shut down in order instead of the process aborting."""
    signal.signal(signal.SIGTERM, _interrupt)


def _show_progress(app_name: str, total: int, done: threading.Event) -> None:
    """A bar of the app's deployments that are up, while ``serve.run`` waits for them."""
    from ray import serve
    from tqdm import tqdm

    def healthy() -> int:
        try:
            app = serve.status().applications.get(app_name)
        except Exception:  # the controller is starting: nothing to show yet
            return 0
        return sum(d.status == "HEALTHY" for d in (app.deployments if app else {}).values())

    with tqdm(total=total, desc="deployments ready", unit="deployment", file=sys.stderr) as bar:
        while not done.wait(0.5):
            bar.update(max(0, healthy() - bar.n))
        bar.update(max(0, healthy() - bar.n))


def run_app(app, config, host: str, port: int, deployments: int = 0) -> None:
    """Start Serve's HTTP on ``host:port`` and deploy ``app``; with ``deployments`` > 0, a bar
    counts them up while ``serve.run`` waits."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    done = threading.Event()
    progress = None
    if deployments:
        progress = threading.Thread(
            target=_show_progress, args=(config.app_name, deployments, done)
        )
        progress.start()
    try:
        serve.run(app, name=config.app_name, route_prefix=config.route_prefix)
    finally:
        done.set()
        if progress is not None:
            progress.join()


def serve_forever() -> None:
    """Until Ctrl-C or SIGTERM (after ``stop_on_sigterm``): KeyboardInterrupt ends it."""
    while True:
        time.sleep(3600)


def shutdown(ray, app_name: str | None = None) -> None:
    """Stop what the command started: on a cluster it joined (``app_name``), delete only its
    app (the cluster's other apps stay); locally, Serve and its proxies; then Ray."""
    from ray import serve

    try:
        if app_name:
            with contextlib.suppress(Exception):  # never deployed: nothing to delete
                serve.delete(app_name)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()
