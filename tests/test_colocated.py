"""``colocate_shards``: the ingress searches the shard groups itself, with the same answers.

The same store served twice over real HTTP, once with a ShardSearcher deployment per group and
once with the groups inside the ingress replica (no actor hop per query): vector and id queries
answer the same ids in the same order, and writes through the colocated app are searchable and
deletable as usual (the lease is written under the ingress replica's id).
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.serve_app import make_store, running_app, serve_replicas
from index.storage.leases import read_leases

pytestmark = pytest.mark.slow


def test_colocated_groups_answer_as_deployed_groups_do(ray_local, scratch_root, caltech_dir):
    store, paths, vectors = make_store(scratch_root / "colocated", caltech_dir, 2, 4, 6)
    probes = list(vectors.values())[:6]
    answers = {}
    for colocate in (False, True):
        layout = {"shards_per_group": None, "colocate_shards": colocate}
        with running_app(store, paths, vectors, **layout) as app:
            with app.client() as client:
                got = []
                for q in probes:
                    r = client.post("/search", json={"vector": q.tolist(), "k": 5})
                    assert r.status_code == 200 and not r.json()["partial"], r.text
                    got.append([h["id"] for h in r.json()["results"]])
                answers[colocate] = got
                stats = client.get("/stats").json()
                assert stats["total_count"] == len(paths) and stats["groups"] == [[0, 1]]
                if colocate:
                    names = {row["deployment"] for row in serve_replicas()}
                    assert not any(n.startswith("ShardSearcher") for n in names), names
                    v = np.zeros(len(probes[0]), np.float32)
                    v[0] = 1
                    r = client.post("/images", json={"vector": v.tolist(), "id": "colocated-new"})
                    assert r.status_code == 201 and r.json()["searchable"], r.text
                    r = client.post("/search", json={"vector": v.tolist(), "k": 1})
                    assert r.json()["results"][0]["id"] == "colocated-new"
                    assert client.delete("/images/colocated-new").status_code == 200
                    r = client.post("/search", json={"id": "colocated-new"})
                    assert r.status_code == 404
                    assert all(read_leases(store, s).served for s in (0, 1))
    assert answers[True] == answers[False]
