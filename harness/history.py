"""A recorded history of operations against the app, and a checker that finds what was lost.

Issue "Nothing lost under any interleaving": seeded clients (``harness.workload``) add, delete,
re-add and read images over HTTP while faults and kills happen; every operation is recorded here
with when it was invoked and when it was answered, and ``check`` reads the history afterwards
for the outcomes the consistency rules (docs/consistency.md) forbid. The checker is plain code
over the records (no Ray, no HTTP), so it is unit-tested on hand-written histories and a failing
run's history can be dumped to JSON with its seed, loaded and checked again.

Times are seconds on one monotonic clock, relative to the history's start. An operation whose
answer never came (a timeout, a reset, a 5xx) has no ``ack``: it may have taken effect at any
time after its invocation, so the checker treats it as still in flight forever. Reads say
``found``: ``True`` (the id was visible), ``False`` (authoritatively not visible: a 404
``unknown_id``), ``None`` (no evidence either way: an error, a partial answer, a vector query
whose top-k missed the id, which an approximate index may do).

Anomaly classes (each reported with the history's seed):

- ``lost``: an acknowledged add not found by the final reads, when every delete of that id had
  been answered before the add was invoked; or an id found by a read and not found by a later
  read with no delete of that id possibly in between;
- ``resurrected``: an acknowledged delete whose id the final reads still find, when every add of
  that id had been answered before the delete was invoked; or found by a read invoked after the
  delete's answer with no add of that id possibly in between;
- ``server_error``: any 5xx answer, except a 503 that says a shard did not answer
  (``UNAVAILABLE_ERRORS``) while a searcher replica was down: between a ``kill`` and the
  ``recovered`` event after it (``/readyz`` 200 again; open-ended when it never came). With
  one replica per shard that is the API's documented answer (503 + ``Retry-After``: the data
  is durable, the only process that serves it is restarting); ``unavailable`` counts them;
- ``unflagged_partial``: an answer with ``shards_answered`` below the shards it was sent to
  (``shards_visited``: a routed store's probe; else ``shards_total``) not flagged
  ``partial``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

WRITES = ("add", "delete")
READS = ("get", "search_id", "search_vector")
ANOMALY_KINDS = ("lost", "resurrected", "server_error", "unflagged_partial")
# 503 errors that say a shard did not answer (serve.http.errors): expected while one is down
UNAVAILABLE_ERRORS = ("shard_unavailable", "no_shard_answered")


@dataclass
class Op:
    """One operation: ``client`` (a name), ``kind`` (``add``, ``delete``, a read kind, or a
    harness event such as ``kill`` / ``rebuild``), the ``id`` it concerns, ``invoke`` and ``ack``
    times (``ack`` None: no answer), the HTTP ``status`` (None: no answer) and ``outcome``: a
    summary of the answer (``found``, ``top`` ids, ``partial``, ``shards_answered``,
    ``shards_total``, ``error``)."""

    client: str
    kind: str
    id: str | None
    invoke: float
    ack: float | None = None
    status: int | None = None
    outcome: dict = field(default_factory=dict)
    index: int = -1  # position in the history, for anomaly reports

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def done_at(self) -> float:
        """When the operation can no longer take effect: its answer, if it was definite (2xx or
        4xx); otherwise never (``inf``)."""
        if self.ack is None or self.status is None or self.status >= 500:
            return math.inf
        return self.ack

    @property
    def found(self) -> bool | None:
        return self.outcome.get("found")


@dataclass
class Anomaly:
    kind: str  # one of ANOMALY_KINDS
    id: str | None
    seed: int
    detail: str
    ops: list[int] = field(default_factory=list)  # indices of the operations involved

    def __str__(self) -> str:
        return f"[seed {self.seed}] {self.kind} {self.id!r}: {self.detail} (ops {self.ops})"


class History:
    """Operations as they are invoked and answered, from any number of threads."""

    def __init__(self, seed: int, meta: dict | None = None) -> None:
        self.seed = seed
        self.meta = dict(meta or {})
        self.ops: list[Op] = []
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def invoke(self, client: str, kind: str, row_id: str | None = None) -> Op:
        """Record an operation as invoked now; complete it with ``ack``."""
        op = Op(str(client), kind, row_id, self.now())
        with self._lock:
            op.index = len(self.ops)
            self.ops.append(op)
        return op

    def ack(self, op: Op, status: int | None, **outcome) -> Op:
        """Record ``op``'s answer (``status`` None: none came) and its summary."""
        t = self.now()
        with self._lock:
            op.ack = t if status is not None else None
            op.status = status
            op.outcome.update(outcome)
        return op

    def snapshot(self) -> list[Op]:
        with self._lock:
            return list(self.ops)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for op in self.snapshot():
            out[op.kind] += 1
        return dict(out)

    # ---- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"seed": self.seed, "meta": self.meta, "ops": [asdict(op) for op in self.snapshot()]}

    def dumps(self) -> str:
        return json.dumps(self.to_json())

    def dump(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.dumps())
        return path

    @classmethod
    def from_json(cls, data: dict) -> History:
        history = cls(int(data["seed"]), data.get("meta"))
        for i, row in enumerate(data["ops"]):
            row = dict(row)
            row["index"] = i
            history.ops.append(Op(**row))
        return history

    @classmethod
    def loads(cls, text: str) -> History:
        return cls.from_json(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> History:
        return cls.loads(Path(path).read_text())


# ---- the checker ---------------------------------------------------------------------------------
def _by_id(ops: Iterable[Op], kinds: tuple[str, ...]) -> dict[str, list[Op]]:
    out: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind in kinds and op.id is not None:
            out[op.id].append(op)
    return out


def _between(writes: list[Op], after: Op, before: Op) -> list[Op]:
    """Writes that may have taken effect between ``after``'s effect and ``before``'s: invoked
    before ``before`` was answered and not finished before ``after`` was invoked."""
    end = before.ack if before.ack is not None else math.inf
    return [w for w in writes if w.invoke < end and w.done_at > after.invoke]


def outage_windows(ops: list[Op]) -> list[tuple[float, float]]:
    """(from, to) of each searcher outage: a ``kill`` until its ``recovered`` answer (``inf``
    when it has none)."""
    kills = [op for op in ops if op.kind == "kill"]
    recovered = [op for op in ops if op.kind == "recovered"]
    windows = []
    for kill in kills:
        back = [r.ack for r in recovered if r.ack is not None and r.invoke >= kill.invoke]
        windows.append((kill.invoke, min(back, default=math.inf)))
    return windows


def unavailable(op: Op, windows: list[tuple[float, float]]) -> bool:
    """A 503 saying a shard did not answer, invoked or answered while a replica was down."""
    if op.status != 503 or op.outcome.get("error") not in UNAVAILABLE_ERRORS:
        return False
    end = op.ack if op.ack is not None else op.invoke
    return any(start <= end and op.invoke <= stop for start, stop in windows)


def _status_anomalies(ops: list[Op], seed: int) -> list[Anomaly]:
    out = []
    windows = outage_windows(ops)
    for op in ops:
        if op.status is not None and op.status >= 500 and not unavailable(op, windows):
            error = op.outcome.get("error")
            out.append(
                Anomaly(
                    "server_error",
                    op.id,
                    seed,
                    f"{op.kind} answered {op.status} {error}",
                    [op.index],
                )
            )
        answered = op.outcome.get("shards_answered")
        total = op.outcome.get("shards_visited") or op.outcome.get("shards_total")
        if (
            op.status == 200
            and answered is not None
            and total is not None
            and answered < total
            and not op.outcome.get("partial")
        ):
            out.append(
                Anomaly(
                    "unflagged_partial",
                    op.id,
                    seed,
                    f"{op.kind}: {answered} of {total} shards answered, partial not set",
                    [op.index],
                )
            )
    return out


def _final_anomalies(
    adds: dict[str, list[Op]], deletes: dict[str, list[Op]], finals: list[Op], seed: int
) -> list[Anomaly]:
    out = []
    for fin in finals:
        if fin.id is None or fin.found is None:
            continue
        row_adds, row_deletes = adds.get(fin.id, []), deletes.get(fin.id, [])
        if not fin.found:
            # visible for sure: an acknowledged add after every delete of the id had finished
            for add in row_adds:
                if add.ok and all(d.done_at < add.invoke for d in row_deletes):
                    out.append(
                        Anomaly(
                            "lost",
                            fin.id,
                            seed,
                            f"add acknowledged at {add.ack:.3f}s, no later delete, "
                            "not found by the final read",
                            [add.index, fin.index],
                        )
                    )
                    break
        else:
            for delete in row_deletes:
                if delete.ok and all(a.done_at < delete.invoke for a in row_adds):
                    out.append(
                        Anomaly(
                            "resurrected",
                            fin.id,
                            seed,
                            f"delete acknowledged at {delete.ack:.3f}s, no later add, "
                            "still found by the final read",
                            [delete.index, fin.index],
                        )
                    )
                    break
    return out


def _read_anomalies(
    adds: dict[str, list[Op]], deletes: dict[str, list[Op]], reads: dict[str, list[Op]], seed: int
) -> list[Anomaly]:
    out = []
    for row_id, row_reads in reads.items():
        row_adds, row_deletes = adds.get(row_id, []), deletes.get(row_id, [])
        seen = [r for r in row_reads if r.found is True and r.ack is not None]
        missed = [r for r in row_reads if r.found is False]
        # lost: found, then (strictly later) not found, with no delete possibly in between
        for miss in missed:
            earlier = [r for r in seen if r.ack < miss.invoke]
            if not earlier:
                continue
            last = max(earlier, key=lambda r: r.ack)
            if not _between(row_deletes, last, miss):
                out.append(
                    Anomaly(
                        "lost",
                        row_id,
                        seed,
                        f"found by {last.kind} at {last.ack:.3f}s, not found by {miss.kind} "
                        f"invoked at {miss.invoke:.3f}s, no delete in between",
                        [last.index, miss.index],
                    )
                )
                break
        # resurrected: an acknowledged delete, then found with no add possibly in between
        for hit in seen:
            done = [d for d in row_deletes if d.ok and d.ack < hit.invoke]
            if not done:
                continue
            delete = max(done, key=lambda d: d.ack)
            if not _between(row_adds, delete, hit):
                out.append(
                    Anomaly(
                        "resurrected",
                        row_id,
                        seed,
                        f"delete acknowledged at {delete.ack:.3f}s, found by {hit.kind} "
                        f"invoked at {hit.invoke:.3f}s, no add in between",
                        [delete.index, hit.index],
                    )
                )
                break
    return out


def check(history: History, final_reads: Iterable[Op] | None = None) -> list[Anomaly]:
    """Every anomaly of ``history`` (see the module docstring for the classes).

    ``final_reads``: reads made after a quiet period longer than the documented visibility bound
    (``delta_poll_s``, plus a replica restart when one was killed); they may be recorded in the
    history too (any read with ``outcome["final"]`` true counts as a final read).
    """
    ops = history.snapshot()
    finals = list(final_reads or [])
    known = {id(op) for op in ops}
    every = ops + [op for op in finals if id(op) not in known]
    chosen = {id(op) for op in finals}
    finals += [op for op in ops if op.outcome.get("final") and id(op) not in chosen]
    adds, deletes = _by_id(every, ("add",)), _by_id(every, ("delete",))
    anomalies = _status_anomalies(every, history.seed)
    anomalies += _read_anomalies(adds, deletes, _by_id(every, READS), history.seed)
    anomalies += _final_anomalies(adds, deletes, finals, history.seed)
    unique, seen = [], set()
    for a in anomalies:  # a final read may show the same loss as a read before it: once per id
        key = (a.kind, a.id) if a.kind in ("lost", "resurrected") else (a.kind, tuple(a.ops))
        if key not in seen:
            seen.add(key)
            unique.append(a)
    return unique


def summary(anomalies: list[Anomaly]) -> dict[str, int]:
    """Anomalies per class."""
    out = {kind: 0 for kind in ANOMALY_KINDS}
    for a in anomalies:
        out[a.kind] = out.get(a.kind, 0) + 1
    return out
