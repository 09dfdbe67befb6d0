"""Background traffic that records everything, for the fault tests and the node-loss benchmark.

``Traffic`` sends one query every ``period_s`` (closed loop, one at a time) and keeps a ``Rec``
of each answer; ``Writer`` does the same with ``POST /images`` writes of explicit ids, so that
afterwards every acknowledged id can be looked for. ``recovery`` says what users saw after a
fault and how long until answers were full again. ``Querier`` queries without pause and notes
any acknowledged delete that comes back; ``top1``, ``versions`` and ``unit_vectors`` are what
the freshness tests (and the freshness benchmark) ask an app between writes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np

from harness.polling import wait_for


@dataclass
class Rec:
    t: float  # sent, seconds on the monotonic clock
    seconds: float
    status: int | None  # None: no HTTP answer (connection refused/reset, client timeout)
    error: str | None  # the JSON error code, or the exception for status None
    partial: bool = False
    missing: tuple[int, ...] = ()

    @property
    def full(self) -> bool:
        return self.status == 200 and not self.partial


class Traffic(threading.Thread):
    """One query every ``period_s`` (closed loop, one at a time) from its own thread."""

    def __init__(self, app, kind: str, period_s: float = 0.1, timeout_s: float = 20.0):
        super().__init__(daemon=True, name=f"traffic-{kind}")
        self.app, self.kind, self.period_s, self.timeout_s = app, kind, period_s, timeout_s
        self.records: list[Rec] = []
        self._halt = threading.Event()

    def _request(self, client, i: int):
        path = self.app.paths[i % len(self.app.paths)]
        if self.kind == "image":
            files = {"file": ("q.jpg", path.read_bytes(), "image/jpeg")}
            return client.post("/search", params={"k": 5}, files=files)
        vector = self.app.vectors[path.resolve().as_uri()].tolist()
        return client.post("/search", json={"vector": vector, "k": 5})

    def run(self) -> None:
        i = 0
        with self.app.client(self.timeout_s) as client:
            while not self._halt.is_set():
                t = time.monotonic()
                try:
                    r = self._request(client, i)
                    body = r.json() if r.headers.get("content-type", "").startswith("app") else {}
                    rec = Rec(t, time.monotonic() - t, r.status_code, body.get("error"))
                    if r.status_code == 200:
                        rec.partial = bool(body["partial"])
                        rec.missing = tuple(m["shard"] for m in body["missing_shards"])
                except (httpx.HTTPError, ValueError) as e:
                    rec = Rec(t, time.monotonic() - t, None, type(e).__name__)
                self.records.append(rec)
                i += 1
                self._halt.wait(max(0.0, self.period_s - (time.monotonic() - t)))

    def since(self, t: float) -> list[Rec]:
        return [r for r in self.records if r.t >= t]

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)


def recovery(records: list[Rec], killed_at: float) -> dict:
    """What users saw after ``killed_at``: counts and the seconds until answers were full again
    (the start of the first full answer after the last non-full one)."""
    after = [r for r in records if r.t >= killed_at]
    bad = [r for r in after if not r.full]
    last_bad = max((r.t for r in bad), default=None)
    back = next((r.t for r in after if r.full and (last_bad is None or r.t > last_bad)), None)
    return {
        "requests": len(after),
        "not_full": len(bad),
        "statuses": dict(Counter(str(r.status) for r in after)),
        "errors": dict(Counter(r.error for r in bad if r.error)),
        "partial": sum(r.partial for r in after),
        "longest_s": round(max((r.seconds for r in after), default=0.0), 2),
        "first_bad_s": round(min(r.t for r in bad) - killed_at, 2) if bad else None,
        "recovered_s": None if back is None else round(back - killed_at, 2),
    }


def wait_for_full_answers(traffic: Traffic, after: float, n: int, timeout_s: float) -> None:
    """Until ``n`` consecutive full answers were sent after ``after``."""

    def streak() -> bool:
        recs = traffic.since(after)
        return len(recs) >= n and all(r.full for r in recs[-n:])

    wait_for(streak, timeout_s, f"{n} full answers in a row", interval_s=0.25)


class Writer(threading.Thread):
    """``POST /images`` with JSON vectors and explicit ids, one at a time; records each answer."""

    def __init__(self, app, period_s: float = 0.1):
        super().__init__(daemon=True, name="writer")
        self.app, self.period_s = app, period_s
        self.answers: list[tuple[str, int | None, float]] = []  # (id, status, seconds)
        self._halt = threading.Event()

    def run(self) -> None:
        rng = np.random.default_rng(8)
        i = 0
        with self.app.client(20) as client:
            while not self._halt.is_set():
                row_id = f"ack-{i:05d}"
                vector = rng.standard_normal(1280).astype(np.float32)
                t = time.monotonic()
                try:
                    r = client.post("/images", json={"vector": vector.tolist(), "id": row_id})
                    status = r.status_code
                except httpx.HTTPError:
                    status = None
                self.answers.append((row_id, status, time.monotonic() - t))
                i += 1
                self._halt.wait(max(0.0, self.period_s - (time.monotonic() - t)))

    def acked(self) -> list[str]:
        return [row_id for row_id, status, _ in self.answers if status == 201]

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)


class Querier(threading.Thread):
    """Queries without pause; records failures and any acknowledged delete that comes back."""

    def __init__(self, port: int, probes: list[np.ndarray], deleted: dict[str, float]):
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        self.probes = probes  # the main thread appends; reading a list while appending is safe
        self.deleted = deleted  # id -> monotonic time its delete was acknowledged
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.resurrected: list[str] = []
        self.latencies: list[float] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            vector = self.probes[i % len(self.probes)]
            i += 1
            started = time.monotonic()
            try:
                r = self.client.post("/search", json={"vector": vector.tolist(), "k": 10})
            except httpx.HTTPError as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                continue
            self.latencies.append(time.monotonic() - started)
            if r.status_code != 200 or r.json().get("partial"):
                self.failures.append(f"{r.status_code}: {r.text[:200]}")
                continue
            self.ok += 1
            for hit in r.json()["results"]:
                acked = self.deleted.get(hit["id"])
                if acked is not None and acked < started:
                    self.resurrected.append(hit["id"])
        self.client.close()


def unit_vectors(rng, n: int, dim: int = 1280) -> np.ndarray:
    """``n`` random unit vectors (the default model's dimension)."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def top1(client: httpx.Client, vector: np.ndarray, k: int = 10) -> list[str]:
    """The ids a vector query answers, best first (a 200 is asserted)."""
    r = client.post("/search", json={"vector": vector.tolist(), "k": k})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


def versions(client: httpx.Client) -> list[int | None]:
    """The index version each shard serves (``/stats``)."""
    return [row.get("version") for row in client.get("/stats").json()["shards"]]
