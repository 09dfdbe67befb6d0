"""Search concurrent queries as one batch, without making a lone query wait.

``QueryBatcher`` runs one batch at a time in a worker thread. A query that arrives while the
searcher is idle starts a batch at once (after ``wait_s``, 0 by default: no added latency at
concurrency 1); queries that arrive while a batch runs queue up and go together as the next
batch (up to ``max_batch``). Under load, batches grow to what arrived during the previous one:
one FAISS call per shard for many queries (the coarse quantizer, the fast-scan tables and the
rerank's vector reads are shared), the throughput a per-request call cannot reach.

Unlike ``ray.serve.batch`` it has no fixed timeout to pay at low load and needs no Serve replica
(the tests drive it directly). Plain asyncio; the batch function runs in a thread.

**A request fails alone.** Requests of one batch come from different callers, so one bad
request must not fail the others: ``run`` returns ``Failed(error)`` in the slot of an item that
failed (its caller gets ``error``, the others their results), and when ``run`` raises for a
batch of several items each item is run again on its own, so only the items that fail alone get
an error (the cost of a failure: one call per item of that batch).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any


def k_band(k: int) -> int:
    """The power-of-4 band of ``k`` (1, 2-4, 5-16, 17-64, 65-256, ...): a sub-batch runs at its
    largest ``k`` (and rerank candidates scale with ``k``), so requests batch only with ``k`` of
    their own band, and a k=10 caller never pays for a co-batched k=1000 (review 2.3)."""
    return max(0, math.ceil(math.log(max(int(k), 1), 4) - 1e-9))


def sub_batches(keys: Sequence[tuple[int, Hashable]]) -> list[list[int]]:
    """Indices of ``(k, parameters)`` items grouped into sub-batches that are searched as one
    call: same parameters (filter, fields, nprobe, ...) and the same ``k_band``; in arrival
    order."""
    groups: dict[tuple, list[int]] = {}
    for i, (k, params) in enumerate(keys):
        groups.setdefault((k_band(k), params), []).append(i)
    return list(groups.values())


@dataclass(frozen=True)
class Failed:
    """What ``run`` puts in the slot of an item that failed: its caller gets ``error``."""

    error: BaseException


class QueryBatcher:
    def __init__(
        self,
        run: Callable[[Sequence[Any]], Sequence[Any]],
        *,
        max_batch: int = 64,
        wait_s: float = 0.0,
    ):
        if max_batch < 1 or wait_s < 0:
            raise ValueError("max_batch must be >= 1 and wait_s >= 0")
        self.run = run  # items -> results, same order; called in a worker thread
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: Any) -> Any:
        """The result of ``item``, computed in a batch with whatever else is queued."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            if self.wait_s > 0 and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.wait_s)  # a short window for company
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            items = [item for item, _ in batch]
            results = await asyncio.to_thread(self._run_isolated, items)
            self.batches += 1
            self.items += len(items)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # a cancelled request is simply dropped
                    continue
                if isinstance(result, Failed):
                    future.set_exception(result.error)
                else:
                    future.set_result(result)

    def _run_isolated(self, items: list[Any]) -> list[Any]:
        """``run(items)``, with every failure confined to the item(s) that cause it: a batch
        that raises is run again one item at a time (in the worker thread)."""
        try:
            results = list(self.run(items))
            if len(results) != len(items):
                raise RuntimeError(f"batch of {len(items)} returned {len(results)} results")
            return results
        except Exception as e:
            if len(items) == 1:
                return [Failed(e)]
        out: list[Any] = []
        for item in items:
            try:
                (result,) = self.run([item])
            except Exception as e:
                result = Failed(e)
            out.append(result)
        return out

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0
