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


def _reason(e: BaseException) -> str:
    """``"error: <ExceptionType>: <first line of the message>"`` (200 characters at most)."""
    message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"error: {type(e).__name__}" + (f": {message}" if message else "")


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
        return False, _reason(e)


def _answered(done: set) -> bool:
    """Whether any of the finished calls ``done`` answered (rather than failed)."""
    return any(not t.cancelled() and t.exception() is None for t in done)


async def gather_with_deadline(
    calls: Mapping[int, Callable[[], Awaitable[Any]]],
    timeout_s: float,
    first_answer_s: float | None = None,
) -> Gathered:
    """Start every call at once; each gets the same ``timeout_s`` from now.

    ``first_answer_s`` (longer than ``timeout_s``): when no call has answered by ``timeout_s``,
    wait on until the first one does, up to ``first_answer_s`` from the start; the others are
    then left out as usual. A busy moment (a swap, a replica starting beside it, a saturated
    box) then costs latency, not a 503 with nothing; once one shard has answered, stragglers
    are still cut at ``timeout_s``.

    One task per call and one ``asyncio.wait`` for all of them: the shared deadline is applied
    once, not by a ``wait_for`` (and its extra task) per shard, which is on every query's path.
    """
    start = time.perf_counter()
    failed: dict[int, str] = {}
    tasks: dict[int, asyncio.Future] = {}
    for shard, make in calls.items():
        try:
            tasks[shard] = asyncio.ensure_future(make())
        except Exception as e:  # e.g. a handle that cannot even send the request
            failed[shard] = f"error: {type(e).__name__}"
    pending: set = set()
    if tasks:
        try:
            done, pending = await asyncio.wait(tasks.values(), timeout=timeout_s)
            while pending and first_answer_s is not None and not _answered(done):
                left = first_answer_s - (time.perf_counter() - start)
                if left <= 0:
                    break
                more, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                done |= more
        except asyncio.CancelledError:  # our own cancellation: take the shard calls with us
            for task in tasks.values():
                task.cancel()
            raise
        for task in pending:
            task.cancel()
    gathered = Gathered(took_ms=(time.perf_counter() - start) * 1000)
    for shard in calls:
        task = tasks.get(shard)
        if task is None:
            gathered.missing[shard] = failed[shard]
        elif task in pending:
            gathered.missing[shard] = "timeout"
        elif task.cancelled():  # cancelled on the callee's side
            gathered.missing[shard] = "error: CancelledError"
        elif task.exception() is not None:  # any failure of one shard must not fail the query
            gathered.missing[shard] = _reason(task.exception())
        else:
            gathered.answers[shard] = task.result()
    return gathered
