"""``cluster-fake.yaml`` run for real on this machine by Ray's autoscaler
(``harness.fake_cluster``):
placement, node loss and scale-down, driven the way cluster users drive the system.

- ``ray job submit`` of the embedding job: the autoscaler starts a GPU-type worker, the embedding
  actor runs there (Ray's state API says where) and, with a fake GPU and no CUDA, the model runs
  on the CPU and says so once in the job's log; the index build's tasks ask for memory and a
  sliver of ``shard_host`` and run on a shard worker the autoscaler starts for them;
- ``serve deploy``: shard replicas only on ``shard_host`` workers, the query embedder on the GPU
  worker, nothing but Serve's controller and proxy on the head (CPU 0);
- a worker node holding a shard replica is killed (its raylet, agents and workers, SIGKILL)
  while vector queries and ``POST /images`` writes run over HTTP: answers stay 200, partial
  while the replica is rescheduled onto a node the autoscaler starts, then full; no
  acknowledged write is lost (in the store and findable by id);
- after ``serve shutdown`` the autoscaler removes every idle worker after its idle timeout.

The figures are printed (``-s``); ``benchmarks/node_loss.py`` runs the same scenario and writes
them to ``benchmarks/results/node_loss.json``. About 4-6 minutes on 2 cores.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from harness import embed_samples as samples
from harness import fake_cluster as fc

pytestmark = pytest.mark.slow

PHOTOS = 40
KEY = "fake-cluster-test-key"
FALLBACK = "embedding on the CPU instead"
REPORT: dict = {}  # printed at the end: what ran where, workers started/removed, node loss


@pytest.fixture(scope="module")
def cluster(scratch_root):
    cluster = fc.FakeCluster(temp_dir=scratch_root / "fake").start()  # short: socket paths
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def catalogue(cluster, caltech_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("fake-cluster")
    photos = samples.link_images(samples.caltech_subset(caltech_dir, PHOTOS), work / "photos")
    logs = fc.embed_and_build(cluster, work / "photos", work / "store")
    return SimpleNamespace(work=work, photos=photos, store=work / "store", logs=logs)


@pytest.fixture(scope="module")
def app(cluster, catalogue):
    return fc.deploy(cluster, catalogue.store, catalogue.photos, KEY, catalogue.work)


def test_embed_job_runs_on_a_gpu_worker_and_falls_back_to_the_cpu(cluster, catalogue):
    log = catalogue.logs["embed"]
    assert f"embedded {PHOTOS} images (0 skipped as already present), 0 errors" in log, log[-3000:]
    assert "1 x efficientnet_lite0 (1 GPU" in log  # the job asked for a GPU per actor
    where = fc.placement(cluster)
    REPORT["embed placement"] = {k: where.get(k) for k in ("embedding actors", "decode tasks")}
    assert where["embedding actors"] and set(where["embedding actors"].values()) == {"embed"}
    assert set(where.get("decode tasks", {}).values()) <= {"embed", "shard"}  # never the head
    # the fake GPU has no CUDA behind it: the one actor says once that it runs on the CPU
    lines = cluster.worker_log_lines(FALLBACK)
    assert len(lines) == 1 and "CUDA_VISIBLE_DEVICES='0'" in lines[0], lines
    assert FALLBACK in log  # streamed to the job's log too


def test_build_tasks_ask_for_memory_and_run_on_a_shard_worker(cluster, catalogue):
    assert f"built {fc.SHARDS} shard(s) ({PHOTOS} vectors)" in catalogue.logs["build"]
    tasks = cluster.tasks("rebuild_shard")
    roles = cluster.roles()
    REPORT["build tasks"] = {t["node_id"]: roles.get(t["node_id"]) for t in tasks}
    assert len(tasks) >= fc.SHARDS, tasks
    for task in tasks:
        asks = task["required_resources"] or {}
        assert asks.get("shard_host", 0) > 0 and asks.get("memory", 0) > 0, task
        assert roles.get(task["node_id"]) == "shard", task


def test_serve_deploy_places_shard_replicas_on_shard_workers_only(cluster, app):
    where = fc.placement(cluster)
    REPORT["serve placement"] = {
        k: v for k, v in where.items() if k not in ("embedding actors", "decode tasks")
    }
    shard_nodes = where["ShardSearcher"]
    assert set(shard_nodes.values()) == {"shard"}, where
    assert len(shard_nodes) == fc.SHARDS  # one shard_host slot per fake node
    for replica in fc.alive_replicas(cluster, "ShardSearcher"):
        assert (replica["required_resources"] or {}).get("shard_host") == 1, replica
    assert set(where["QueryEmbedder"].values()) == {"embed"}
    assert set(where["Serve controller and proxy"].values()) == {"head"}
    head_work = {k for k, v in where.items() if "head" in v.values()}
    assert head_work <= {"Serve controller and proxy", "Rebuilder"}, where  # Rebuilder: 0 CPU
    with app.client(60) as client:
        stats = client.get("/stats").json()
        assert stats["embedder"]["device"] == "cpu"  # granted a GPU, runs on the CPU
        photo = app.paths[5]
        files = {"file": (photo.name, photo.read_bytes(), "image/jpeg")}
        r = client.post("/search", files=files, params={"k": 3})
    assert r.status_code == 200 and r.json()["results"][0]["uri"] == str(photo), r.text


def test_losing_a_shard_node_under_load_keeps_answers_and_acknowledged_writes(cluster, app):
    seen = fc.lose_a_shard_node(cluster, app)
    REPORT["node loss"] = {k: v for k, v in seen.items() if k != "queries"}
    assert seen["failed_queries"] == 0, seen["query_statuses"]  # never an error, never no answer
    assert seen["partial_answers"] > 0  # while the shard's replica was being rescheduled
    assert seen["partial_missing_shards"] == [int(seen["killed_deployment"][-1])]
    assert seen["seconds_to_full_answers"] is not None
    assert seen["acked_writes_lost"] == 0, seen["lost_ids"]
    assert seen["writes_acknowledged_after_loss"] >= 5
    assert seen["replacement_node"] != seen["killed_node"]
    assert seen["replacement_node_role"] == "shard"


def test_idle_workers_are_removed_after_the_idle_timeout(cluster, app):
    removal = fc.idle_removal(cluster)
    REPORT["scale-down"] = removal
    lost = (REPORT.get("node loss") or {}).get("killed_node")
    REPORT["workers"] = workers = fc.summary(cluster, (lost,) if lost else ())
    assert not cluster.workers("ALIVE")
    # the autoscaler removed every worker it started: the idle ones after the idle timeout (and
    # the killed one once the GCS had marked it dead)
    assert workers["workers_removed"] == workers["workers_started"] >= 4
    idle = workers["workers_started"] - len(workers["workers_lost"])
    assert workers["workers_removed_idle"] == idle, workers["removal_reasons"]
    assert removal["idle_timeout_s"] / 2 <= removal["seconds_to_no_workers"]
    assert removal["seconds_to_no_workers"] <= removal["idle_timeout_s"] + 60
    nodes = workers.pop("nodes")
    print("\nfake cluster:", json.dumps(REPORT, indent=1, default=str))
    print("nodes:", [(n["node_id"][-5:], n["role"], n["state"]) for n in nodes])
