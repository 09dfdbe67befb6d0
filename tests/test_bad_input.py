"""A barrage of bad (and odd but valid) requests against the live HTTP app, with good queries
interleaved from another thread: every bad request gets its 4xx and JSON error code, every odd
image a 200, every good query its right top-1, no 5xx anywhere and no replica restarted.

The table of kinds is ``harness/bad_inputs.py`` (shared with ``benchmarks/load.py``). The app runs
with the default limits (20 MiB uploads, 50 MP images), so the 50 MB upload and the 100 MP PNG
bomb are over them as in production.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from harness import bad_inputs
from harness.serve_app import make_store, replica_identity, running_app

pytestmark = pytest.mark.slow

NUM_SHARDS = 2


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    store, paths, vectors = make_store(
        scratch_root / "bad-input-store", caltech_dir, NUM_SHARDS, classes=6, per_class=8
    )
    with running_app(store, paths, vectors) as running:
        yield running


class GoodTraffic:
    """Good queries from a background thread (alternating photo uploads and vector queries),
    each checked for status 200, a full answer and the expected top-1."""

    def __init__(self, app):
        self.app = app
        self.statuses: Counter[int] = Counter()
        self.wrong: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        uris = list(self.app.vectors)
        with self.app.client(60) as client:
            i = 0
            while not self._stop.is_set():
                path = self.app.paths[i % len(self.app.paths)]
                uri = path.resolve().as_uri()
                if i % 2:
                    uri = uris[i % len(uris)]
                    r = client.post("/search", json={"vector": self.app.vectors[uri].tolist()})
                else:
                    files = {"file": ("q.jpg", path.read_bytes(), "image/jpeg")}
                    r = client.post("/search", params={"k": 3}, files=files)
                self.sent += 1
                self.statuses[r.status_code] += 1
                if r.status_code != 200:
                    self.wrong.append(f"{r.status_code} {r.text[:200]}")
                else:
                    body = r.json()
                    if body["partial"] or body["results"][0]["uri"] != uri:
                        self.wrong.append(f"top-1 {body['results'][0]['uri']} != {uri}")
                i += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=120)


def test_table_is_big_enough():
    assert len(bad_inputs.KINDS) >= 18
    statuses = {case.status for case in bad_inputs.CASES}
    assert {200, 400, 404, 405, 413, 415, 422} <= statuses


def test_bad_input_barrage_while_good_queries_keep_answering(app):
    first = app.paths[0]
    ctx = bad_inputs.context_from(
        1280, first.read_bytes(), app.vectors[first.resolve().as_uri()], app.config
    )
    before = replica_identity()
    assert {"Ingress", "QueryEmbedder", "ShardSearcher0", "ShardSearcher1"} <= {
        key.split("/")[0] for key in before
    }
    outcomes = []
    start = time.perf_counter()
    with GoodTraffic(app) as good, app.client(60) as client:
        for _ in range(2):  # twice: the second round hits replicas that already saw the first
            for case in bad_inputs.CASES:
                outcomes.append(bad_inputs.send(client, case, ctx))
        while good.sent < 10:  # at least a few good queries overlap the barrage
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    after = replica_identity()

    failed = [(o.kind, o.status, o.error, o.note) for o in outcomes if not o.ok]
    statuses = Counter(o.status for o in outcomes) + good.statuses
    fivexx = sum(n for s, n in statuses.items() if s is not None and s >= 500)
    restarts = sum(1 for key in before if after.get(key) != before[key])
    print(
        f"\nbad-input barrage: {len(bad_inputs.KINDS)} kinds, {len(outcomes)} bad/odd requests "
        f"+ {good.sent} good queries in {seconds:.1f}s; statuses {dict(sorted(statuses.items()))}"
        f"; 5xx {fivexx}; replica restarts {restarts}"
    )
    big = [o for o in outcomes if o.kind == "upload_50mb"]
    print("50 MB upload:", big[0].note, f"{big[0].seconds * 1000:.0f} ms")
    for row in failed:
        print("FAILED KIND", *row)
    assert not failed, failed
    assert fivexx == 0
    assert not good.wrong, good.wrong[:5]
    assert after == before, "a replica (or Serve's controller/proxy) restarted"
    assert big[0].ok
