"""Seeded concurrent clients over HTTP that record every operation in a ``History``.

Issue "Nothing lost under any interleaving": each client (a thread with its own
``numpy`` generator seeded from ``(seed, client)``) picks, in a seeded random order, among adding
an image with and without an id, deleting one it added, re-adding one it deleted (a new vector:
the newest row wins), and reading any id written so far by ``GET /images/{id}``, a search by id,
or a search by the id's own vector (its own id expected at top-1 when visible). Optional chaos on
a thread of its own: SIGKILL one ShardSearcher replica's process at ``kill_at_s`` (found with
``harness.serve_app.serve_replicas``, so Ray must be initialised in this process) and a forced
rebuild (``POST /admin/rebuild?force=true``, ``&retrain=true`` with ``retrain``) at
``rebuild_at_s`` and every ``rebuild_every_s`` after it, and a command-line build
(``pipelines/rebuild.py --force`` of one shard, ``--retrain`` with ``cli_retrain``, a process of
its own) at ``cli_build_at_s``. After a kill, a ``recovered`` event is
answered once ``/readyz`` is 200 again (the checker's outage window). The choices replay from the
seed; the interleaving does not, which is the point: ``harness.history.check`` judges whatever
interleaving happened.

``s3_app`` is the app these histories run against: a small indexed store on moto's S3, the app
reading and writing it through the seeded fault proxy with botocore's standard retries.

``final_reads`` waits until the app is ready and no write was answered for longer than the
documented visibility bound, then reads every id once (``outcome["final"]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np

from harness.faultproxy import FaultProxy, FaultRates, FaultSchedule
from harness.history import History, Op
from harness.polling import wait_for

# operation -> weight (the choice is seeded per client; ops that need an id fall back to an add)
MIX = {
    "add": 0.22,
    "add_noid": 0.06,
    "delete": 0.12,
    "readd": 0.08,
    "get": 0.16,
    "search_id": 0.16,
    "search_vector": 0.20,
}


def _error(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def _pick(rng: np.random.Generator, items: list) -> int:
    """An index into ``items`` from exactly one draw, whatever its length: the choices that
    follow stay the seed's even when another client's progress changed the length."""
    return min(int(rng.random() * len(items)), len(items) - 1)


@dataclass
class Workload:
    """``clients`` threads for ``duration_s`` or ``max_ops`` operations in all."""

    base_url: str
    api_key: str
    dim: int
    seed: int
    clients: int = 2
    duration_s: float = 30.0
    max_ops: int = 200
    k: int = 5
    kill_at_s: float | None = None
    rebuild_at_s: float | None = None
    rebuild_every_s: float | None = None  # more forced rebuilds after the first (a soak's)
    retrain: bool = False  # the forced rebuilds retrain (``--retrain``) instead of reusing
    cli_build_at_s: float | None = None  # ``pipelines/rebuild.py --force`` of every shard
    cli_retrain: bool = False  # ... with ``--retrain``
    cli_build: list[str] | None = None  # its command line (``S3App.workload`` gives it)
    timeout_s: float = 20.0
    prefix: str = ""  # id prefix, so several histories can share one app
    history: History = field(init=False)
    kills: int = 0
    top1_misses: int = 0  # visible by a search with its own vector, but not at top-1

    def __post_init__(self) -> None:
        self.history = History(
            self.seed,
            {"clients": self.clients, "duration_s": self.duration_s, "max_ops": self.max_ops},
        )
        self._vectors: dict[str, np.ndarray] = {}  # id -> its newest vector (any client)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._recoveries: list[threading.Thread] = []

    # ---- running -------------------------------------------------------------------------------
    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.base_url, timeout=self.timeout_s, headers=headers)

    def run(self) -> History:
        threads = [
            threading.Thread(target=self._client, args=(n,), name=f"history-client-{n}")
            for n in range(self.clients)
        ]
        chaos = threading.Thread(target=self._chaos, name="history-chaos", daemon=True)
        for t in threads:
            t.start()
        chaos.start()
        for t in threads:
            t.join()
        self._halt.set()
        chaos.join()
        for t in self._recoveries:  # each kill's "recovered" is in the history before it ends
            t.join()
        return self.history

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._vectors)

    def _unit(self, rng: np.random.Generator) -> np.ndarray:
        v = rng.standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def _client(self, n: int) -> None:
        rng = np.random.default_rng([self.seed, n])
        kinds, weights = list(MIX), np.array(list(MIX.values()))
        weights = weights / weights.sum()
        live: list[str] = []  # ids this client added and did not delete since
        gone: list[str] = []  # ids this client deleted
        budget = self.max_ops // self.clients
        period = self.duration_s / max(1, budget)
        with self.client() as http:
            for i in range(budget):
                started = self.history.now()
                if started > self.duration_s:
                    break
                kind = str(rng.choice(kinds, p=weights))
                if kind == "delete" and not live or kind == "readd" and not gone:
                    kind = "add"
                if kind in ("get", "search_id", "search_vector") and not (live or gone):
                    kind = "add"  # decided by this client's own past, so the seed replays it
                if kind == "add":
                    row_id = f"{self.prefix}c{n}-{i}"
                    if self._add(http, n, row_id, self._unit(rng)):
                        live.append(row_id)
                elif kind == "add_noid":
                    row_id = self._add(http, n, None, self._unit(rng))
                    if row_id:
                        live.append(row_id)
                elif kind == "delete":
                    row_id = live.pop(_pick(rng, live))
                    if self._delete(http, n, row_id):
                        gone.append(row_id)
                    else:
                        live.append(row_id)
                elif kind == "readd":
                    row_id = gone.pop(_pick(rng, gone))
                    if self._add(http, n, row_id, self._unit(rng)):
                        live.append(row_id)
                    else:
                        gone.append(row_id)
                else:
                    ids = self.ids()
                    self._read(http, n, kind, ids[_pick(rng, ids)])
                self._halt.wait(max(0.0, started + period - self.history.now()))

    # ---- operations ----------------------------------------------------------------------------
    def _call(self, op: Op, send) -> httpx.Response | None:
        try:
            r = send()
        except httpx.HTTPError as e:
            self.history.ack(op, None, error=type(e).__name__)
            return None
        return r

    def _add(self, http: httpx.Client, n: int, row_id: str | None, vector) -> str | None:
        """The id added (None when not acknowledged)."""
        op = self.history.invoke(n, "add", row_id)
        body = {"vector": vector.tolist()}
        if row_id is not None:
            body["id"] = row_id
        else:
            body["uri"] = f"mem://{self.prefix}noid-{op.index}"
        r = self._call(op, lambda: http.post("/images", json=body))
        if r is None:
            return None
        answer = r.json() if r.status_code == 201 else {}
        if row_id is None:
            op.id = answer.get("id")
        self.history.ack(op, r.status_code, error=_error(r), searchable=answer.get("searchable"))
        if r.status_code != 201:
            return None
        with self._lock:
            self._vectors[op.id] = vector
        return op.id

    def _delete(self, http: httpx.Client, n: int, row_id: str) -> bool:
        op = self.history.invoke(n, "delete", row_id)
        r = self._call(op, lambda: http.delete(f"/images/{row_id}"))
        if r is None:
            return False
        answer = r.json() if r.status_code == 200 else {}
        self.history.ack(op, r.status_code, error=_error(r), hidden=answer.get("hidden"))
        return r.status_code == 200

    def _read(self, http: httpx.Client, n, kind: str, row_id: str, final: bool = False) -> Op:
        op = self.history.invoke(n, kind, row_id)
        if kind == "get":
            send = lambda: http.get(f"/images/{row_id}")  # noqa: E731
        elif kind == "search_id":
            send = lambda: http.post("/search", json={"id": row_id, "k": self.k})  # noqa: E731
        else:
            with self._lock:
                vector = self._vectors[row_id]
            body = {"vector": vector.tolist(), "k": self.k}
            send = lambda: http.post("/search", json=body)  # noqa: E731
        r = self._call(op, send)
        if r is None:
            return op
        error = _error(r)
        outcome: dict = {"error": error, "final": final}
        found = None
        if r.status_code == 404 and error == "unknown_id":
            found = False
        elif r.status_code == 200 and kind == "get":
            found = r.json().get("id") == row_id
        elif r.status_code == 200:
            body = r.json()
            top = [hit["id"] for hit in body.get("results", [])]
            outcome.update(
                top=top,
                partial=body.get("partial"),
                shards_answered=body.get("shards_answered"),
                shards_visited=body.get("shards_visited"),
                shards_total=body.get("shards_total"),
            )
            if kind == "search_id" or row_id in top:
                found = True
                if top[:1] != [row_id]:
                    with self._lock:
                        self.top1_misses += 1
        self.history.ack(op, r.status_code, found=found, **outcome)
        return op

    # ---- chaos ---------------------------------------------------------------------------------
    def _chaos(self) -> None:
        rng = np.random.default_rng([self.seed, 1_000_000])
        rebuilds = [] if self.rebuild_at_s is None else [self.rebuild_at_s]
        while self.rebuild_every_s and rebuilds[-1] + self.rebuild_every_s < self.duration_s:
            rebuilds.append(rebuilds[-1] + self.rebuild_every_s)
        kills = [] if self.kill_at_s is None else [(self.kill_at_s, "kill")]
        cli = [] if self.cli_build_at_s is None else [(self.cli_build_at_s, "cli_build")]
        events = sorted(kills + cli + [(t, "rebuild") for t in rebuilds])
        path = "/admin/rebuild?force=true" + ("&retrain=true" if self.retrain else "")
        for t, what in events:
            if self._halt.wait(max(0.0, t - self.history.now())):
                return
            if what == "kill":
                self._kill(rng)
            elif what == "cli_build":
                self._cli_build()
            else:
                with self.client() as http:
                    op = self.history.invoke("chaos", "rebuild")
                    r = self._call(op, lambda: http.post(path))
                    if r is not None:
                        self.history.ack(op, r.status_code, error=_error(r))

    def _cli_build(self) -> None:
        """A command-line build of a seeded shard (``--force``, ``--retrain`` with
        ``cli_retrain``) as a process of its own, racing the Rebuilder's: commits are
        parent-checked, so one of two builds from the same live version is superseded and
        planned again."""
        if not self.cli_build:
            return
        shard = int(np.random.default_rng([self.seed, 3]).integers(2))
        command = [*self.cli_build, "--force", "--shards", str(shard)]
        command += ["--retrain"] if self.cli_retrain else []
        op = self.history.invoke("chaos", "cli_build")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            self.history.ack(op, None, error="timeout")
            return
        self.history.ack(op, done.returncode, error=done.stderr[-300:] if done.returncode else None)

    def _kill(self, rng: np.random.Generator) -> None:
        from harness.serve_app import serve_replicas  # needs Ray: imported only for a kill

        rows = [r for r in serve_replicas() if r["deployment"].startswith("ShardSearcher")]
        if not rows:
            return
        row = rows[int(rng.integers(len(rows)))]
        op = self.history.invoke("chaos", "kill", row["deployment"])
        os.kill(row["pid"], signal.SIGKILL)
        self.kills += 1
        self.history.ack(op, 0, pid=row["pid"])
        waiter = threading.Thread(
            target=self._await_recovery, args=(row["deployment"],), name="history-recovery"
        )
        self._recoveries.append(waiter)
        waiter.start()

    def _await_recovery(self, deployment: str, timeout_s: float = 180.0) -> None:
        """Record ``recovered`` (invoked at the kill's answer, answered when ``/readyz`` is 200
        again): the window in which the killed shard may answer 503 ``shard_unavailable``."""
        op = self.history.invoke("chaos", "recovered", deployment)

        def ready(http: httpx.Client) -> bool:
            try:
                return http.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        with self.client() as http:
            try:
                wait_for(lambda: ready(http), timeout_s, "/readyz 200 after a kill", 0.2)
            except AssertionError:
                self.history.ack(op, None, error="not ready again")
                return
        self.history.ack(op, 200)

    # ---- the final reads -----------------------------------------------------------------------
    def final_reads(self, quiet_s: float, ready_timeout_s: float = 120.0) -> list[Op]:
        """Once ``/readyz`` is 200 and no write was answered for ``quiet_s`` (longer than the
        documented bound, ``delta_poll_s``), read every id any add or delete named (answered or
        not) once with ``GET /images/{id}``.

        A replica unused for ``poll_idle_after_s`` polls less (``serve.deployments.idle``); its
        documented bound is one listing after its next request. So one search (every shard
        replica answers it, which wakes its polls) goes first, then ``quiet_s`` more."""

        def last_write() -> float:
            acks = [
                op.ack or op.invoke
                for op in self.history.snapshot()
                if op.kind in ("add", "delete", "rebuild", "cli_build", "kill", "recovered")
            ]
            return max(acks, default=0.0)

        with self.client() as http:
            wait_for(lambda: http.get("/readyz").status_code == 200, ready_timeout_s, "/readyz 200")
            wait_for(
                lambda: self.history.now() - last_write() >= quiet_s,
                quiet_s + 60,
                f"{quiet_s} s without a write",
                interval_s=0.1,
            )
            http.post("/search", json={"vector": [1.0] * self.dim, "k": 1})  # wakes every replica
            woken = self.history.now()
            wait_for(lambda: self.history.now() - woken >= quiet_s, quiet_s + 5, "one more bound")
            written = sorted(
                {op.id for op in self.history.snapshot() if op.kind in ("add", "delete") and op.id}
            )
            return [self._read(http, "final", "get", row_id, final=True) for row_id in written]


# ---- the app under test --------------------------------------------------------------------------
DIM = 64
RATES = FaultRates(delay=0.05, reset=0.01, drop=0.005, error_500=0.01, error_503=0.01)
RETRIES = {"retries": {"max_attempts": 10, "mode": "standard"}}  # botocore's standard retries
DELTA_POLL_S = 0.5  # the documented bound for a write to reach every replica
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class S3App:
    url: str
    api_key: str
    proxy: FaultProxy
    store_uri: str  # the store, for reading it directly (not through the proxy)

    def workload(self, seed: int, rates: FaultRates = RATES, **kwargs) -> Workload:
        """Clients for one history: the proxy switches to ``seed``'s own fault schedule (so the
        seed replays the S3 faults too) and ids are prefixed with the seed."""
        self.proxy.schedule = FaultSchedule(seed, rates)
        return Workload(
            self.url,
            self.api_key,
            DIM,
            seed,
            prefix=f"s{seed}-",
            cli_build=self.cli_build_command(),
            **kwargs,
        )

    def cli_build_command(self) -> list[str]:
        """``pipelines/rebuild.py`` on this store through the fault proxy, as a user runs it."""
        options = {**self.proxy.storage_options, "config_kwargs": RETRIES}
        return [
            sys.executable,
            os.path.join(REPO, "pipelines", "rebuild.py"),
            "--store",
            self.store_uri,
            "--storage-option",
            json.dumps(options),
            "--grace-s",
            "1",
        ]


@contextlib.contextmanager
def s3_app(s3_server, rows: int = 300) -> Iterator[S3App]:
    """The app (2 shards, one ShardSearcher deployment each, two Ingress replicas, every
    replica's clock skewed by up to 2 s, no image model) over ``rows`` random vectors indexed
    on moto's S3 (Ray must be initialised); the store is written directly, the app goes
    through the fault proxy (no faults until ``workload`` picks a seed)."""
    from harness.serve_app import app_config, ingress_settings
    from harness.serving import serving
    from harness.stores import write_store
    from index.live.rebuild import rebuild_shard
    from index.storage.store import Store

    uri = f"{s3_server.new_bucket()}/store"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"base-{i:04d}" for i in range(rows)]
    store = write_store(Store(uri, dict(s3_server.storage_options)), ids, ids, x, 2)
    for shard in (0, 1):
        rebuild_shard(store, shard)
    proxy = FaultProxy(s3_server.endpoint, FaultSchedule(0, RATES, enabled=False)).start()
    config = app_config(
        uri,
        # two ingress replicas whose clocks (and the searchers') disagree by up to 2 x 2 s
        ingress=ingress_settings(num_replicas=2),
        clock_skew_ms=2000,
        storage_options={**proxy.storage_options, "config_kwargs": RETRIES},
        image_queries=False,
        shards_per_group=1,  # one ShardSearcher deployment per shard: the chaos kills one
        model="test-model",
        weights="none",
        delta_poll_s=DELTA_POLL_S,
        reload_interval_s=1.0,  # searchers swap to what the rebuilds commit (then GC retires)
        lease_interval_s=0.5,
        lease_ttl_s=3,
        rebuild_check_s=0,  # rebuilds on request only (the chaos thread asks for one)
        rebuild_gc_grace_s=1,
        rebuild_num_cpus=0.5,
    )
    try:
        with serving(config, keep_serve=True) as served:
            with httpx.Client(base_url=served.url, timeout=10) as client:
                wait_for(lambda: client.get("/readyz").status_code == 200, 120, "/readyz 200")
            yield S3App(served.url, config.api_key, proxy, uri)
    finally:
        proxy.stop()


@contextlib.contextmanager
def s3_app_session(workdir) -> Iterator[S3App]:
    """A local Ray (its temp dir under ``workdir``), moto's S3 server and ``s3_app`` on them:
    what a benchmark over the app on S3 with faults needs (``benchmarks/histories.py``,
    ``benchmarks/soak.py``); everything is stopped on the way out."""
    from harness.s3 import S3Server
    from pipelines.local_ray import init_local_ray

    ray = init_local_ray(os.path.join(workdir, "ray"), num_cpus=4)
    server = S3Server()
    try:
        with s3_app(server) as app:
            yield app
    finally:
        server.stop()
        ray.shutdown()
