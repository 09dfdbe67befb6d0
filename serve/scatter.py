"""Scatter a call to every shard, gather what comes back before one shared deadline.

A shard that is slow, dead (its replica actor died and Serve has not replaced it yet) or failing
is left out and named, so the caller can answer ``partial: true`` with the shards that answered
instead of failing the whole query. Kept free of Ray so it can be tested with plain coroutines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Gathered:
    answers: dict[int, Any] = field(default_factory=dict)  # shard -> its answer
    missing: dict[int, str] = field(default_factory=dict)  # shard -> "timeout" / "error: <Type>"
    took_ms: float = 0.0


async def _resolve(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


async def call_with_deadline(awaitable: Awaitable[Any], timeout_s: float) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, reason)``; never raises except on our own cancellation.

    The reason is ``"timeout"`` or ``"error: <ExceptionType>: <message>"`` (RayActorError when a
    replica died, a Serve error while no replica is available, or an exception of the callee).
    """
    try:
        return True, await asyncio.wait_for(_resolve(awaitable), timeout_s)
    except TimeoutError:
        return False, "timeout"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # any failure of one shard must not fail the query
        message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return False, f"error: {type(e).__name__}" + (f": {message}" if message else "")


async def gather_with_deadline(
    calls: Mapping[int, Callable[[], Awaitable[Any]]], timeout_s: float
) -> Gathered:
    """Start every call at once; each gets the same ``timeout_s`` from now."""
    start = time.perf_counter()

    async def one(shard: int, make: Callable[[], Awaitable[Any]]) -> tuple[int, bool, Any]:
        try:
            awaitable = make()
        except Exception as e:  # e.g. a handle that cannot even send the request
            return shard, False, f"error: {type(e).__name__}"
        ok, value = await call_with_deadline(awaitable, timeout_s)
        return shard, ok, value

    outcome = await asyncio.gather(*(one(s, make) for s, make in calls.items()))
    gathered = Gathered(took_ms=(time.perf_counter() - start) * 1000)
    for shard, ok, value in outcome:
        if ok:
            gathered.answers[shard] = value
        else:
            gathered.missing[shard] = value
    return gathered
