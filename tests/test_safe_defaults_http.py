"""Safe defaults over real HTTP (``serve.http.security``): a keyed app, an anonymous and a keyed
client.

Anonymous callers cannot write or call ``/admin``; they get the lower caps on ``nprobe``,
``candidates`` and image pixels, with a refusal that says the key lifts them; and ``/stats``
shows them the kind of a server-side failure, never its text (here: a live index version with
a corrupt file, whose error names the version and the file). The same app serves keyed callers
in full. The rules themselves are pinned without Ray in ``test_safe_defaults.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from harness import embed_samples as samples
from harness.polling import wait_for
from harness.serve_app import make_store, running_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    store, paths, vectors = make_store(
        scratch_root / "safe-store", caltech_dir, num_shards=2, classes=3, per_class=6
    )
    with running_app(store, paths, vectors, reload_interval_s=0.5) as running:
        yield running


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
