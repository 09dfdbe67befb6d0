"""Nothing lost under any interleaving: the history checker (``harness.history``) on hand-written
histories, each anomaly class found and a clean history clean."""

from __future__ import annotations

import pytest

from harness.history import History, Op, check, summary


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
