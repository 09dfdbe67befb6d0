"""How long a replica's poll thread waits before it looks at the store again: longer while idle.

A replica polls the store for what other processes wrote (``serve.deployments.searcher``: the
manifest for new live versions, each shard's parts and tombstones for the delta). At a fixed
0.5 s that is 14,400 listings per hour per shard on an idle object store, paid whether anything
changes or not (review 9d94e46, section 3). ``Backoff`` doubles the wait after each poll that
found nothing new, from the configured interval up to a cap, and goes back to the interval as
soon as anything happens: a poll that found something, or activity on the replica (a search, a
write handed over, a stamp asked for); a replica used within the last ``idle_after_s`` never
backs off, so the documented bounds hold unchanged for replicas that serve traffic. Activity on a
backed-off replica also wakes its poll thread at once (``touch`` returns True), so a replica that
starts serving again is caught up within one listing rather than one long wait.

The cost is bounded by the cap: an idle replica-shard makes about ``3600 / cap`` polls an hour
(``benchmarks/control_plane_idle.py`` counts them against moto). What it costs in freshness is in
``docs/consistency.md``: writes routed to a replica are searchable there on return, as before;
what only a poll brings (another replica's writes, an embedding job's parts, a new live version)
reaches a replica that was idle within the cap, and one that serves traffic within the interval.
"""

from __future__ import annotations

import threading
import time


class Backoff:
    """Doubling waits from ``base_s`` to ``cap_s`` while polls find nothing and the replica has
    not been used for ``idle_after_s``; thread-safe. ``cap_s=None``: never backs off."""

    def __init__(self, base_s: float, cap_s: float | None, idle_after_s: float = 10.0):
        if base_s <= 0:
            raise ValueError(f"base_s must be > 0, got {base_s}")
        self.base_s = float(base_s)
        # a cap below the interval (or none): no backoff
        self.cap_s = self.base_s if cap_s is None else max(float(cap_s), self.base_s)
        self.idle_after_s = float(idle_after_s)
        self._wait_s = self.base_s
        self._touched = time.monotonic()  # starting counts as being used
        self._lock = threading.Lock()

    @property
    def wait_s(self) -> float:
        """The wait before the next poll."""
        return self._wait_s

    def quiet(self) -> float:
        """A poll found nothing new: wait twice as long next time (up to the cap), once the
        replica has been unused for ``idle_after_s`` (a replica in use keeps the interval)."""
        with self._lock:
            if time.monotonic() - self._touched < self.idle_after_s:
                return self._wait_s
            self._wait_s = min(self.cap_s, 2 * self._wait_s)
            return self._wait_s

    def touch(self) -> bool:
        """Something happened (a poll found a change, or the replica was used): back to the
        base interval. True when it was backed off, i.e. the caller should poll now."""
        self._touched = time.monotonic()
        if self._wait_s == self.base_s:  # the hot path of every search: no lock
            return False
        with self._lock:
            backed_off = self._wait_s > self.base_s
            self._wait_s = self.base_s
            return backed_off
