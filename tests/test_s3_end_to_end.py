"""The whole system on a real S3 API (moto's server on 127.0.0.1), as the cluster runs it.

Embedding job (Ray Data) -> index build (Ray tasks) -> the Serve app, all on ``s3://``; then,
while a thread queries without pause: API adds and deletes, a *second process* writing rows and
a delete straight into the store (what another replica or a re-run embedding job does), a
requested rebuild of every shard, the searchers' swap, and garbage collection. A monitor checks
the whole time that no version a searcher reports serving is ever deleted.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness.polling import wait_for
from harness.serve_store import caltech_sample
from harness.serving import serve_port
from harness.traffic import Querier, top1, unit_vectors
from index.rows import schema
from index.storage.leases import read_leases
from index.storage.manifest import load_manifest
from index.storage.publish import list_versions
from pipelines.build_index import BuildConfig
from pipelines.build_index import run as build_run
from pipelines.embed import run_job
from pipelines.embed_config import EmbedJobConfig
from serve.config import DeploymentSettings, ServeConfig

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEY = "s3-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHARDS = 2


class LeaseMonitor(threading.Thread):
    """Every 0.2 s: is every version a fresh lease names still in the store?"""

    def __init__(self, store, shards: int):
        super().__init__(daemon=True)
        self.store, self.shards = store, shards
        self.stop = threading.Event()
        self.checks = 0
        self.violations: list[str] = []
        self.served: set[str] = set()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for shard in range(self.shards):
                for replica, name in read_leases(self.store, shard, ttl_s=3).fresh.items():
                    self.served.add(name)
                    if self.store.exists(self.store.index_version_dir(shard, name)):
                        continue
                    again = read_leases(self.store, shard, ttl_s=3).fresh.get(replica)
                    if again == name:  # not a swap between the two reads: really gone
                        self.violations.append(f"shard {shard}: {name} served by {replica}")
            self.checks += 1


def test_s3_store_end_to_end(ray_local, s3_server, caltech_dir, tmp_path):
    from ray import serve

    from serve.app import build_app

    uri = f"{s3_server.new_bucket()}/store"
    options = s3_server.storage_options
    photos = caltech_sample(caltech_dir, classes=4, per_class=4)
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))

    embedded = run_job(
        EmbedJobConfig(
            input=[str(listing)],
            store=uri,
            storage_options=options,
            num_shards=SHARDS,
            batch_size=8,
            actors=1,
        )
    )
    assert embedded.embedded == len(photos) and embedded.errors == 0
    built = build_run(BuildConfig(store=uri, storage_options=options, num_cpus=0.5))
    assert sorted(built.built) == [0, 1] and not built.failed, built.line()
    store = ServeConfig(store=uri, storage_options=options).open_store()
    table = store.read_parquet(
        [store.path(p) for s in range(SHARDS) for p in load_base_parts(store, s)]
    )
    catalogue = dict(
        zip(
            table[schema.ID].to_pylist(),
            schema.arrow_to_vectors(table[schema.EMBEDDING]),
            strict=True,
        )
    )
    assert len(catalogue) == len(photos)

    port = serve_port(keep_serve=True)  # the session's Serve (harness.serving)
    config = ServeConfig(
        store=uri,
        storage_options=options,
        api_key=KEY,
        embed_threads=1,
        shard_deadline_ms=3000,
        reload_interval_s=0.5,
        delta_poll_s=0.3,
        lease_interval_s=0.5,
        lease_ttl_s=3,
        rebuild_check_s=0,  # rebuilds on request only
        rebuild_gc_grace_s=1,
        rebuild_num_cpus=0.5,
        access_log=False,
        shutdown_wait_s=0.2,  # its replicas stop at once when the module ends
        searcher=DeploymentSettings(num_cpus=0.25),
    )
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deleted: dict[str, float] = {}
    added: dict[str, np.ndarray] = {}
    querier = Querier(port, list(catalogue.values()), deleted)
    monitor = LeaseMonitor(store, SHARDS)
    try:
        wait_for(lambda: client.get("/readyz").status_code == 200, 90, "the app ready")
        start_dirs = [load_manifest(store).shards[s].dir for s in range(SHARDS)]
        querier.start()
        monitor.start()
        rng = np.random.default_rng(0)

        # API writes: adds and deletes, durable on S3 before the reply
        for i, vector in enumerate(unit_vectors(rng, 8)):
            body = {"vector": vector.tolist(), "id": f"a{i}"}
            r = client.post("/images", headers=AUTH, json=body)
            assert r.status_code == 201 and r.json()["searchable"], r.text
            added[f"a{i}"] = vector
        for row_id in list(catalogue)[:3]:
            assert client.delete(f"/images/{row_id}", headers=AUTH).status_code == 200
            deleted[row_id] = time.monotonic()

        # a second process writes straight into the store: every replica must see it
        other = unit_vectors(rng, 4)
        np.save(tmp_path / "other.npy", other)
        gone = list(catalogue)[3]
        script = textwrap.dedent(
            f"""
            import numpy as np
            from index.rows import schema
            from index.live.parts import write_rows, write_tombstones
            from index.rows.sharding import shard_of
            from index.storage.store import Store
            store = Store({uri!r})  # options from $VISUAL_SEARCH_STORAGE_OPTIONS
            vectors = np.load({str(tmp_path / "other.npy")!r})
            for i, v in enumerate(vectors):
                row_id = f"other-{{i}}"
                table = schema.embeddings_table([row_id], [f"s3://other/{{i}}"], v[None])
                write_rows(store, shard_of(row_id, {SHARDS}), table)
            write_tombstones(store, shard_of({gone!r}, {SHARDS}), [{gone!r}])
            """
        )
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=s3_server.env(), check=True)
        for i, vector in enumerate(other):
            wait_for(lambda v=vector, i=i: top1(client, v)[0] == f"other-{i}", 10, f"other-{i}")
            added[f"other-{i}"] = vector
        wait_for(
            lambda: client.post("/search", json={"id": gone}).status_code == 404,
            10,
            "the other process's delete",
        )
        deleted[gone] = time.monotonic()  # seen by its shard's replica: never back from here

        # rebuild every shard on request: the searchers swap, GC follows the leases
        r = client.post("/admin/rebuild", headers=AUTH)
        assert r.status_code == 202 and sorted(r.json()["started"]) == [0, 1], r.text
        wait_for(
            lambda: all(load_manifest(store).shards[s].dir != start_dirs[s] for s in range(SHARDS)),
            120,
            "both shards rebuilt",
        )
        wait_for(
            lambda: all(
                list_versions(store, s) == [load_manifest(store).shards[s].dir]
                and not store.list_parts(s)
                and not store.list_tombstone_parts(s)
                for s in range(SHARDS)
            ),
            60,
            "old versions collected and the folded-in parts and tombstones retired",
            0.5,
        )
        served_after = {
            name for s in range(SHARDS) for name in read_leases(store, s, ttl_s=3).served
        }
        assert served_after == {load_manifest(store).shards[s].dir for s in range(SHARDS)}
        for row_id, vector in added.items():
            assert top1(client, vector)[0] == row_id, row_id
        for row_id in deleted:
            assert client.post("/search", json={"id": row_id}).status_code == 404, row_id
    finally:
        querier.stop.set()
        monitor.stop.set()
        querier.join(30)
        monitor.join(30)
        client.close()
        serve.delete(config.app_name)
    assert querier.ok > 20, querier.ok
    assert querier.failures == [], querier.failures[:5]
    assert querier.resurrected == [], querier.resurrected[:5]
    assert monitor.checks > 10 and monitor.violations == [], monitor.violations[:5]
    assert len(monitor.served) >= 2 * SHARDS  # the monitor saw both generations served
    print(
        f"\nS3 end to end: {querier.ok} queries, 0 failed; {len(added)} adds found, "
        f"{len(deleted)} deletes hidden; {monitor.checks} lease checks, 0 served versions "
        f"deleted; served over time: {sorted(monitor.served)}"
    )


def load_base_parts(store, shard: int) -> list[str]:
    from index.storage.coverage import base_parts_of, live_meta

    return base_parts_of(live_meta(store, shard, load_manifest(store).shards[shard]))
