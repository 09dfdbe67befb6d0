"""The one clock that stamps writes (``ingested_at``, ``deleted_at``): wall-clock milliseconds
that never repeat or go back within a process, so in one process an add after a delete of the
same id is always newer than the tombstone (``index.rows.visibility``: a tombstone hides rows it
is at least as new as).

Across processes it is still a wall clock: ordering writes to one shard across ingress replicas
and jobs without trusting clocks is the consistency work's (DESIGN, "Consistency under
concurrency"); it replaces this module's body, not its callers.
"""

from __future__ import annotations

import threading
import time

_lock = threading.Lock()
_last = 0


def now_ms() -> int:
    """Milliseconds since the epoch, strictly increasing within this process."""
    global _last
    with _lock:
        _last = max(int(time.time() * 1000), _last + 1)
        return _last
