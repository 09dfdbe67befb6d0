"""The clock that stamps writes (``ingested_at``, ``deleted_at``): a hybrid logical clock.

Wall-clock milliseconds that never repeat or go back within a process (``now_ms``), and that
move past any stamp this process was shown (``stamp_after``): the serving app asks the replica
of the shard that owns an id for the stamp of every write of that id
(``serve.deployments.shard_holder.ShardHolder.stamp``), and that replica stamps it after every
stamp it gave and after the newest write of the id its view holds (a replica that restarts has
read every part before it serves). So a write of an id acknowledged before another write of the
same id was sent is older than it, on any process and whatever their clocks say: a delete
after an add hides it, a re-add after a delete shows again
(``index.rows.visibility``: a tombstone hides rows it is at least as new as). Wall clocks still
order writes that are concurrent (neither answered before the other was sent), and the
embedding job's rows, stamped with its plan time (``pipelines/embed_plan.py``), which every
later delete is newer than.

``set_skew_ms`` offsets this process's wall clock: the history checker's clock skew
(``ServeConfig.clock_skew_ms``, tests only).
"""

from __future__ import annotations

import random
import threading
import time

_lock = threading.Lock()
_last = 0
_skew_ms = 0


def now_ms() -> int:
    """Milliseconds since the epoch (plus this process's skew), strictly increasing here."""
    return stamp_after(-1)


def stamp_after(newest_ms: int) -> int:
    """A stamp later than ``newest_ms`` and than every stamp this process gave: the clock
    moves past what it was shown (the hybrid logical clock's receive step)."""
    global _last
    with _lock:
        _last = max(int(time.time() * 1000) + _skew_ms, _last + 1, int(newest_ms) + 1)
        return _last


def set_skew_ms(ms: int) -> None:
    """Offset this process's wall clock by ``ms`` (tests: clock skew between replicas)."""
    global _skew_ms
    _skew_ms = int(ms)


def skew_for(name: str, max_skew_ms: int) -> int:
    """A seeded draw in ``[-max_skew_ms, max_skew_ms]`` for the process called ``name``, set
    as its skew (0 leaves the clock alone); returns it."""
    skew = random.Random(name).randint(-max_skew_ms, max_skew_ms) if max_skew_ms else 0
    set_skew_ms(skew)
    return skew
