"""A barrage of bad (and odd but valid) requests against the live HTTP app, with good queries
interleaved from another thread: every bad request gets its 4xx and JSON error code, every odd
image a 200, every good query its right top-1, no 5xx anywhere and no replica restarted.

The table of kinds is ``harness/bad_inputs.py`` (shared with ``benchmarks/load.py``). The app runs
with the default limits (20 MiB uploads, 50 MP images), so the 50 MB upload and the 100 MP PNG
bomb are over them as in production.

The same app then checks the safe defaults (``serve.http.security``) with an anonymous and a
keyed client: anonymous callers cannot write or call ``/admin``; they get the lower caps on
``nprobe``, ``candidates`` and image pixels, with a refusal that says the key lifts them; and
``/stats`` shows them the kind of a server-side failure, never its text (here: a live index
version with a corrupt file, whose error names the version and the file). Keyed callers are
served in full. The rules themselves are pinned without Ray in ``test_safe_defaults.py``. (One
app for both: each deploy costs ~20 s of the suite.)
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import numpy as np
import pytest

from harness import bad_inputs
from harness import embed_samples as samples
from harness.polling import wait_for
from harness.serve_app import make_store, replica_identity, running_app

pytestmark = pytest.mark.slow

NUM_SHARDS = 2


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    store, paths, vectors = make_store(
        scratch_root / "bad-input-store", caltech_dir, NUM_SHARDS, classes=6, per_class=8
    )
    # manifest polling on: the /stats test below commits a corrupt live version
    with running_app(store, paths, vectors, reload_interval_s=0.5) as running:
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
    assert {"Ingress", "QueryEmbedder", "ShardSearcher0"} <= {key.split("/")[0] for key in before}
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


# ---- safe defaults: anonymous and keyed callers --------------------------------------------------
def _vector(app) -> list[float]:
    return app.vectors[app.paths[0].resolve().as_uri()].tolist()


def test_writes_and_admin_need_the_key(app):
    body = {"vector": np.eye(1, 1280, 3, dtype=np.float32)[0].tolist(), "id": "safe-1"}
    with app.client(keyed=False) as anon, app.client() as keyed:
        for r in (
            anon.post("/images", json=body),
            anon.delete("/images/safe-1"),
            anon.post("/admin/rebuild", params={"force": "true"}),
            anon.get("/admin/rebuild"),
        ):
            assert (r.status_code, r.json()["error"]) == (401, "unauthorized"), r.text
        r = keyed.post("/images", json=body)
        assert r.status_code == 201, r.text
        assert keyed.delete("/images/safe-1").status_code == 200


def test_anonymous_callers_get_lower_caps_and_keyed_ones_do_not(app):
    query = {"vector": _vector(app), "k": 3}
    with app.client(keyed=False) as anon, app.client() as keyed:
        for extra, error in (({"nprobe": 1000}, "nprobe"), ({"candidates": 5000}, "candidates")):
            r = anon.post("/search", json={**query, **extra})
            assert (r.status_code, r.json()["error"]) == (422, f"{error}_out_of_range"), r.text
            assert "API key" in r.json()["detail"]
            assert keyed.post("/search", json={**query, **extra}).status_code == 200
        assert anon.post("/search", json={**query, "nprobe": 200}).status_code == 200
        big = {"file": ("big.png", samples.bomb_png(4500), "image/png")}  # 20 MP, 1-bit
        r = anon.post("/search", files=big)
        assert (r.status_code, r.json()["error"]) == (413, "decompression_bomb"), r.text
        assert keyed.post("/search", files=big).status_code == 200


def test_stats_show_anonymous_callers_no_paths(app):
    from index.live.rebuild import RebuildOptions, build_shard
    from index.storage.publish import commit_results

    broken = build_shard(app.store, 0, RebuildOptions(force=True))
    with open(os.path.join(app.store.index_version_dir(0, broken.dir), "index.faiss"), "r+b") as f:
        f.write(b"\0not a FAISS index\0" * 4)
    commit_results(app.store, [broken])  # the live version on disk is now unloadable
    with app.client(keyed=False) as anon, app.client() as keyed:

        def refused() -> dict | None:
            row = keyed.get("/stats").json()["shards"][0]
            return row if broken.dir in (row["reload_error"] or "") else None

        row = wait_for(refused, 60, "shard 0 to refuse the corrupt version")  # keyed: full text
        assert row["reload_error"].startswith("IndexLoadError: ")
        anon_stats = anon.get("/stats")
        assert anon_stats.status_code == 200
        assert anon_stats.json()["shards"][0]["reload_error"] == "IndexLoadError"
        assert str(app.store.root) not in anon_stats.text and broken.dir not in anon_stats.text
        assert anon.post("/search", json={"vector": _vector(app)}).status_code == 200
    good = build_shard(app.store, 0, RebuildOptions(force=True))
    commit_results(app.store, [good])  # leave the app serving a good version
