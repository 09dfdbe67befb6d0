"""Waiting without sleeps-as-synchronisation: poll a condition with a deadline.

The one place for this helper (``free_port`` is re-exported from ``pipelines.local_ray``):
every test that waits for a server, a replica or a log line uses ``wait_for`` and fails with
what it was waiting for and the last value seen.
"""

from __future__ import annotations

import threading
import time

from pipelines.local_ray import free_port  # noqa: F401  (re-exported for the tests)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll ``predicate`` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)  # pacing between polls, not synchronisation
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


def finishes_within(timeout_s: float, fn, *args) -> tuple[bool, object]:
    """``fn(*args)`` on a daemon thread: (whether it returned within ``timeout_s``, its result
    or None). For tests that a call does not wait on something held elsewhere."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive(), (out[0] if out else None)
