"""Nothing lost under any interleaving: the history checker (``harness.history``) on hand-written
histories (each anomaly class found, a clean history clean), the seeded clients
(``harness.workload``) against a tiny in-memory app that is right or loses writes on purpose,
and two short seeded histories against the real app on moto's S3 behind the seeded fault proxy
(``harness.faultproxy``), one of them with a ShardSearcher replica SIGKILLed and a forced rebuild.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from harness.history import History, Op, check, summary
from harness.workload import DELTA_POLL_S, Workload, s3_app


def op(h: History, client, kind, row_id, invoke, ack, status, **outcome) -> Op:
    """An operation at fixed times (the recorder's clock is replaced by the hand-written one)."""
    o = Op(str(client), kind, row_id, invoke, ack, status, dict(outcome), len(h.ops))
    h.ops.append(o)
    return o


def final(h: History, row_id, found, t=100.0) -> Op:
    return op(
        h, "final", "get", row_id, t, t + 0.01, 200 if found else 404, found=found, final=True
    )


FULL = {"partial": False, "shards_answered": 2, "shards_total": 2}
HALF = {"shards_answered": 1, "shards_total": 2}  # + partial: True or False


def kinds(anomalies) -> list[tuple[str, str | None]]:
    return sorted((a.kind, a.id) for a in anomalies)


def clean_history() -> History:
    """Adds, deletes, a re-add, reads in every order the rules allow, and a delete overlapping
    a read (either outcome is fine)."""
    h = History(seed=5)
    op(h, 0, "add", "a", 0.0, 0.1, 201)
    op(h, 0, "get", "a", 0.2, 0.3, 200, found=True)
    op(h, 1, "add", "b", 0.0, 0.2, 201)
    op(h, 1, "search_vector", "b", 0.3, 0.4, 200, found=True, **FULL)
    op(h, 1, "delete", "b", 0.5, 0.7, 200)
    op(h, 0, "get", "b", 0.6, 0.65, 200, found=True)  # overlaps the delete: may see either
    op(h, 0, "get", "b", 0.8, 0.9, 404, found=False)
    op(h, 1, "add", "b", 1.0, 1.1, 201)  # re-added
    op(h, 0, "search_id", "b", 1.2, 1.3, 200, found=True, **FULL)
    op(
        h, 0, "search_vector", "a", 1.4, 1.5, 200, found=None, partial=True, **HALF
    )  # the id's shard missing: no evidence
    op(h, 1, "add", "c", 2.0, None, None)  # no answer: may or may not exist
    op(h, 1, "delete", "d", 2.0, 2.1, 200)
    op(h, 0, "kill", None, 2.5, 2.5, None)
    for row_id, found in (("a", True), ("b", True), ("c", False), ("d", False)):
        final(h, row_id, found)
    return h


def test_a_clean_history_has_no_anomaly():
    assert check(clean_history()) == []


def test_a_history_round_trips_through_json(tmp_path):
    h = clean_history()
    again = History.load(h.dump(tmp_path / "h.json"))
    assert again.seed == 5 and [o.kind for o in again.ops] == [o.kind for o in h.ops]
    assert check(again) == []


def test_the_recorder_times_and_numbers_operations_from_threads():
    import threading

    h = History(seed=1)

    def client(n):
        for i in range(50):
            o = h.invoke(n, "add", f"{n}-{i}")
            h.ack(o, 201)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o.index for o in h.ops] == list(range(200))
    assert all(o.ack >= o.invoke and o.ok for o in h.ops)
    assert h.counts() == {"add": 200}


def test_an_acknowledged_add_missing_at_the_final_reads_is_lost():
    h = History(seed=7)
    op(h, 0, "add", "x", 0.0, 0.1, 201)
    final(h, "x", False)
    (a,) = check(h)
    assert (a.kind, a.id, a.seed) == ("lost", "x", 7) and "[seed 7]" in str(a)


def test_an_add_deleted_afterwards_or_concurrently_is_not_expected():
    h = History(seed=7)
    op(h, 0, "add", "x", 0.0, 0.1, 201)
    op(h, 1, "delete", "x", 0.05, None, None)  # overlapping, no answer: may have hidden it
    op(h, 0, "add", "y", 0.0, 0.1, 201)
    op(h, 0, "delete", "y", 0.2, 0.3, 200)
    final(h, "x", False)
    final(h, "y", False)
    assert check(h) == []


def test_found_then_not_found_without_a_delete_is_lost():
    h = History(seed=3)
    op(h, 0, "add", "x", 0.0, 0.1, 201)
    op(h, 1, "get", "x", 0.2, 0.3, 200, found=True)
    op(h, 1, "search_id", "x", 0.4, 0.5, 404, found=False)
    op(h, 0, "delete", "x", 0.6, 0.7, 200)  # after the miss: no excuse
    final(h, "x", False)
    assert kinds(check(h)) == [("lost", "x")]


def test_a_read_of_an_unacknowledged_add_counts_too():
    """Seen while its add was still in flight, then gone: visibility went backwards."""
    h = History(seed=3)
    op(h, 0, "add", "x", 0.0, None, None)
    op(h, 1, "get", "x", 0.2, 0.3, 200, found=True)
    op(h, 1, "get", "x", 0.4, 0.5, 404, found=False)
    found = check(h)
    assert ("lost", "x") in kinds(found) and ("server_error", "x") not in kinds(found)


def test_an_acknowledged_delete_visible_at_the_final_reads_is_resurrected():
    h = History(seed=9)
    op(h, 0, "add", "x", 0.0, 0.1, 201)
    op(h, 0, "delete", "x", 0.2, 0.3, 200)
    final(h, "x", True)
    assert kinds(check(h)) == [("resurrected", "x")]


def test_found_again_after_a_delete_without_a_re_add_is_resurrected():
    h = History(seed=9)
    op(h, 0, "add", "x", 0.0, 0.1, 201)
    op(h, 0, "delete", "x", 0.2, 0.3, 200)
    op(h, 1, "search_vector", "x", 0.4, 0.5, 200, found=True, **FULL)
    op(h, 0, "add", "x", 0.6, 0.7, 201)  # re-added only after the read
    final(h, "x", True)
    assert kinds(check(h)) == [("resurrected", "x")]


def test_a_re_add_in_between_explains_a_find_after_a_delete():
    h = History(seed=9)
    op(h, 0, "add", "x", 0.0, 0.1, 201)
    op(h, 0, "delete", "x", 0.2, 0.3, 200)
    op(h, 0, "add", "x", 0.35, 0.6, 201)
    op(h, 1, "get", "x", 0.4, 0.5, 200, found=True)  # overlaps the re-add
    final(h, "x", True)
    assert check(h) == []


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_any_5xx_is_an_anomaly(status):
    h = History(seed=2)
    op(h, 0, "search_vector", None, 0.0, 0.1, status, error="shard_unavailable")
    (a,) = check(h)
    assert a.kind == "server_error" and str(status) in a.detail
    assert summary([a])["server_error"] == 1


def test_a_shard_unavailable_503_counts_only_while_a_replica_is_down():
    """503 ``shard_unavailable`` between a kill and ``/readyz`` 200 again is the documented
    answer; before the kill, after the recovery, or a 500 inside the window is an anomaly."""
    h = History(seed=8)
    op(h, 0, "get", "x", 0.5, 0.6, 503, error="shard_unavailable")  # before the kill
    op(h, "chaos", "kill", "ShardSearcher0", 1.0, 1.0, 0)
    op(h, "chaos", "recovered", "ShardSearcher0", 1.0, 9.0, 200)
    op(h, 0, "get", "y", 2.0, 3.5, 503, error="shard_unavailable")  # inside: expected
    op(h, 1, "search_id", "y", 8.5, 9.5, 503, error="no_shard_answered")  # overlaps the end
    op(h, 1, "search_id", "y", 4.0, 4.1, 500, error="internal")  # a 500 is never expected
    op(h, 0, "get", "z", 9.5, 9.6, 503, error="shard_unavailable")  # after the recovery
    found = check(h)
    assert sorted((a.id, a.detail.split()[2]) for a in found) == [
        ("x", "503"),
        ("y", "500"),
        ("z", "503"),
    ]


def test_a_kill_that_never_recovers_keeps_its_window_open():
    h = History(seed=8)
    op(h, "chaos", "kill", "ShardSearcher1", 1.0, 1.0, 0)
    op(h, "chaos", "recovered", "ShardSearcher1", 1.0, None, None)
    op(h, 0, "get", "y", 50.0, 50.1, 503, error="shard_unavailable")
    assert check(h) == []


def test_fewer_shards_answered_than_asked_must_be_flagged_partial():
    h = History(seed=4)
    op(h, 0, "search_vector", "x", 0.0, 0.1, 200, found=None, partial=False, **HALF)
    op(h, 0, "search_vector", "x", 0.2, 0.3, 200, found=None, partial=True, **HALF)
    assert kinds(check(h)) == [("unflagged_partial", "x")]


def test_final_reads_may_be_passed_apart_from_the_history():
    h = History(seed=6)
    op(h, 0, "add", "x", 0.0, 0.1, 201)
    reads = [Op("final", "get", "x", 50.0, 50.1, 404, {"found": False})]
    assert kinds(check(h, reads)) == [("lost", "x")]
    assert check(h) == []  # without final reads, nothing says it is gone


# ---- the seeded clients against a tiny in-memory app -------------------------------------------
class MemoryApp(BaseHTTPRequestHandler):
    """The HTTP API's add/delete/get/search on a dict; ``forget`` drops every n-th add after
    acknowledging it (a lost write on purpose)."""

    rows: dict[str, list[float]] = {}
    lock = threading.Lock()
    forget = 0
    adds = 0
    forgotten: set[str] = set()

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def do_GET(self) -> None:
        if self.path == "/readyz":
            return self._answer(200, {})
        row_id = self.path.rsplit("/", 1)[1]
        with self.lock:
            known = row_id in self.rows
        if known:
            return self._answer(200, {"id": row_id})
        self._answer(404, {"error": "unknown_id"})

    def do_DELETE(self) -> None:
        row_id = self.path.rsplit("/", 1)[1]
        with self.lock:
            self.rows.pop(row_id, None)
        self._answer(200, {"id": row_id, "hidden": True})

    def do_POST(self) -> None:
        body = self._body()
        cls = type(self)
        with self.lock:
            if self.path == "/images":
                row_id = body.get("id") or body["uri"].rsplit("/", 1)[1]
                cls.adds += 1
                if cls.forget and cls.adds % cls.forget == 0:
                    cls.forgotten.add(row_id)
                else:
                    self.rows[row_id] = body["vector"]
                return self._answer(201, {"id": row_id, "searchable": True})
            if "id" in body and body["id"] not in self.rows:
                return self._answer(404, {"error": "unknown_id"})
            query = np.asarray(self.rows[body["id"]] if "id" in body else body["vector"])
            ids = list(self.rows)
            scores = np.asarray([self.rows[i] for i in ids]) @ query if ids else np.zeros(0)
            top = [{"id": ids[j]} for j in np.argsort(-scores)[: body.get("k", 5)]]
        self._answer(
            200, {"results": top, "partial": False, "shards_answered": 1, "shards_total": 1}
        )


@pytest.fixture
def memory_app():
    MemoryApp.rows, MemoryApp.forget, MemoryApp.adds, MemoryApp.forgotten = {}, 0, 0, set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), MemoryApp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_seeded_clients_on_a_correct_app_record_a_clean_history(memory_app):
    work = Workload(memory_app, "key", dim=8, seed=3, clients=3, duration_s=2.0, max_ops=240)
    history = work.run()
    finals = work.final_reads(quiet_s=0.1)
    counts = history.counts()
    ran = sum(counts.values()) - len(finals)  # the final reads are recorded too
    # max_ops at most; fewer when duration_s ran out first (a loaded box: 121 seen under a soak),
    # so the lower bound only says the clients made progress: speed is not this test's business
    assert 40 <= ran <= 240 and finals
    assert {"add", "delete", "get", "search_id", "search_vector"} <= set(counts)
    assert check(history, finals) == [] and work.top1_misses == 0
    again = Workload(memory_app, "key", dim=8, seed=3, clients=3, duration_s=2.0, max_ops=240)
    # the same seed makes the same choices (the interleaving may differ)
    first = [(o.client, o.kind) for o in history.ops if o.client == "0"]
    MemoryApp.rows = {}
    second = [(o.client, o.kind) for o in again.run().ops if o.client == "0"]
    n = min(len(first), len(second))  # the duration may cut either run a little shorter
    assert n > 10 and second[:n] == first[:n]


def test_the_seeded_clients_catch_an_app_that_forgets_writes(memory_app):
    MemoryApp.forget = 5
    work = Workload(memory_app, "key", dim=8, seed=4, clients=2, duration_s=2.0, max_ops=120)
    history = work.run()
    anomalies = check(history, work.final_reads(quiet_s=0.1))
    lost = {a.id for a in anomalies if a.kind == "lost"}
    assert lost and lost <= MemoryApp.forgotten  # found, and only what was forgotten
    assert summary(anomalies)["lost"] == len(anomalies) and all(a.seed == 4 for a in anomalies)


# ---- the real app on S3 behind the fault proxy --------------------------------------------------
QUIET_S = 6 * DELTA_POLL_S  # well past the documented bound before the final reads


@pytest.fixture(scope="module")
def app_on_s3(ray_local, s3_server):
    with s3_app(s3_server) as app:
        yield app


@pytest.mark.slow
# (2202, True): a ShardSearcher SIGKILL at 8 s and a forced rebuild at 14 s, after the faults
# history on the same app. It found acknowledged adds missing and a delete undone after the
# killed replica came back (it served before reading the parts written while it loaded); fixed
# by ShardHolder.catch_up, whose own test is tests/test_shard_ready.py.
@pytest.mark.parametrize(
    "seed, chaos", [(1101, False), (2202, True)], ids=["faults", "faults+kill+rebuild"]
)
def test_a_seeded_history_on_s3_with_faults_loses_nothing(app_on_s3, seed, chaos, tmp_path):
    proxy = app_on_s3.proxy
    faults_before = proxy.faults_injected
    work = app_on_s3.workload(
        seed,
        clients=2,
        duration_s=25.0,
        max_ops=200,
        kill_at_s=8.0 if chaos else None,
        rebuild_at_s=14.0 if chaos else None,
    )
    history = work.run()
    finals = work.final_reads(quiet_s=QUIET_S)
    anomalies = check(history, finals)
    keep = Path(os.environ.get("VISUAL_SEARCH_HISTORY_DIR") or tmp_path)  # to keep a failing one
    saved = history.dump(keep / f"history-{seed}.json")
    faults = proxy.faults_injected - faults_before
    statuses = Counter(f"{o.kind}:{o.status}" for o in history.ops)
    print(
        f"\nhistory seed {seed}: {dict(sorted(statuses.items()))}, {faults} S3 faults injected, "
        f"{work.kills} kills, {work.top1_misses} top-1 misses, anomalies {summary(anomalies)}"
        f" ({saved})"
    )
    # the dumped history (final reads included) replays the verdict from its seed's file
    assert [str(a) for a in check(History.load(saved))] == [str(a) for a in anomalies]
    assert faults > 0
    if chaos:
        assert work.kills == 1
        assert [o.status for o in history.ops if o.kind == "recovered"] == [200]
    assert not anomalies, "\n".join(str(a) for a in anomalies[:30])
