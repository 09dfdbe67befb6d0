"""Waiting without sleeps-as-synchronisation: poll a condition with a deadline; free ports.

The one place for these two helpers; every test that waits for a server, a replica or a log
line uses ``wait_for`` and fails with what it was waiting for and the last value seen.
"""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
