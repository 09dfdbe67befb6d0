"""Races between builds, deletes, jobs and the store's backend (REVIEW-9d94e46 1.1, 1.3, 1.4, 1.8,
1.11), each played out on a real store with the project's own functions.

- A build that started from an older live version never commits over a newer one: its commit is
  refused by parent, not by version number, and the shard is planned again (1.1).
- A delete that lands while the embedding job runs stays in force, also after a rebuild and a
  retried write (1.3).
- Manifest commits fail closed on a backend whose ``mode="create"`` is not a conditional create,
  unless a setting opts in to check-then-write (1.4).
- One unreadable part no longer stalls a shard's refresh (1.8).
- ``pipelines/rebuild.py --gc-wait-s`` collects its own garbage once the grace has passed (1.11).
"""

from __future__ import annotations

import logging
import pickle
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from harness.stores import write_store
from index.live.delta import load_live_shard
from index.live.parts import write_rows, write_tombstones
from index.live.rebuild import RebuildOptions, rebuild_shard
from index.rows import schema
from index.rows.sharding import shard_of, uri_id
from index.storage import store as store_module
from index.storage.gc import collect_garbage
from index.storage.manifest import Manifest, ShardState, commit_manifest, load_manifest
from index.storage.publish import ShardBuildResult, apply_results, list_versions
from index.storage.store import (
    ENV_NONATOMIC_CREATE,
    OPTION_NONATOMIC_CREATE,
    NonAtomicCreateError,
    Store,
    probe_conditional_create,
)

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows_table(prefix: str, vectors: np.ndarray) -> pa.Table:
    ids = [f"{prefix}-{i:04d}" for i in range(len(vectors))]
    return schema.embeddings_table(ids, [f"file:///p/{i}.jpg" for i in ids], vectors)


def local_store(tmp_path: Path, n: int, seed: int = 0) -> tuple[Store, np.ndarray]:
    x = unit(np.random.default_rng(seed), n)
    ids = [f"base-{i:04d}" for i in range(n)]
    store = write_store(tmp_path / "store", ids, [f"file:///p/{i}.jpg" for i in ids], x, 1)
    return store, x


# ---- 1.1: a stale build never wins the commit ----------------------------------------------------
def test_stale_build_is_refused_after_a_newer_commit_and_gc(tmp_path):
    """The review's scenario: a ``retrain`` build reads its rows from V1; meanwhile 50 rows and
    a delete arrive, a fast rebuild commits V2 and GC (past its grace) deletes V1 and retires the
    parts and tombstones V2 folded in. The slow build's commit must be refused (its parent V1 is
    no longer live), else its version lacks the 50 rows, whose part is gone for good, and
    brings the deleted row back."""
    store, _ = local_store(tmp_path, 2000)
    first = rebuild_shard(store, 0)
    v1 = first["dir"]
    rng = np.random.default_rng(1)
    write_rows(store, 0, rows_table("p2", unit(rng, 100)))
    write_tombstones(store, 0, ["base-0000"])
    late = rows_table("p3", unit(rng, 50))
    events: dict = {}

    def meanwhile(stage: str) -> None:
        if stage != "read" or events:
            return
        events["p3"] = write_rows(store, 0, late)  # after the slow build read its rows
        write_tombstones(store, 0, ["base-0001"])
        events["fast"] = rebuild_shard(store, 0)  # reuses the quantizer: fast
        events["gc"] = collect_garbage(store, 0, grace_s=1.0, now=time.time() + 5)

    slow = rebuild_shard(store, 0, RebuildOptions(retrain=True), on_stage=meanwhile)
    fast = events["fast"]
    assert fast["built"] and events["gc"]["versions"] == [v1]  # V1 and its inputs are gone
    assert not store.exists(store.path(events["p3"]))  # retired: V2's base parts hold its rows

    live = load_manifest(store).shards[0]
    view = load_live_shard(store, 0, live.dir, DIM, "ip")
    assert view.count == 2000 + 100 + 50 - 2  # nothing lost, both deletes in force
    assert all(view.vector_of(i) is not None for i in late[schema.ID].to_pylist())
    assert view.vector_of("base-0000") is None and view.vector_of("base-0001") is None
    assert live.dir == fast["dir"] == slow["dir"]
    assert slow["superseded"] and not slow["built"] and slow["reason"] == "up to date"
    # the superseded build left nothing behind: no directory, no base parts
    assert list_versions(store, 0) == [live.dir]
    meta = view.meta
    assert sorted(store.list_base_parts(0)) == sorted(meta["base_parts"])
    assert meta["parent"] == v1 and len(slow["discarded"]) == 1


def test_a_build_whose_inputs_gc_retired_mid_read_plans_again(tmp_path, monkeypatch):
    """GC may retire what a slow build is still reading (a newer version went live and its
    grace passed): the build is superseded and planned again, not failed."""
    from index.live import rebuild as rebuild_module

    store, _ = local_store(tmp_path, 600)
    rebuild_shard(store, 0)
    write_rows(store, 0, rows_table("new", unit(np.random.default_rng(6), 30)))
    real_read_rows = rebuild_module.read_rows
    events: dict = {}

    def read_rows(store_, plan, dim):
        if not events:  # a newer build commits and GC retires V1's base parts and the new part
            events["slow read"] = True
            events["fast"] = rebuild_shard(store, 0)
            events["gc"] = collect_garbage(store, 0, grace_s=1.0, now=time.time() + 5)
        return real_read_rows(store_, plan, dim)

    monkeypatch.setattr(rebuild_module, "read_rows", read_rows)
    slow = rebuild_shard(store, 0, RebuildOptions(retrain=True))
    assert events["fast"]["built"] and events["gc"]["versions"]
    assert slow["superseded"] and not slow["built"] and slow["reason"] == "up to date"
    live = load_manifest(store).shards[0].dir
    assert live == events["fast"]["dir"] and load_live_shard(store, 0, live, DIM, "ip").count == 630


def test_apply_results_goes_by_parent_never_by_number():
    manifest = Manifest("m", "w", DIM, 2)
    manifest.shards[0] = ShardState(version=2, dir="v000002-aaaaaaaa")

    def result(version: int, name: str, **meta) -> ShardBuildResult:
        return ShardBuildResult(0, version, name, 10, {"created_at": 1.0, **meta})

    stale = result(3, "v000003-bbbbbbbb", parent="v000001-cccccccc")  # higher number, old parent
    assert apply_results(manifest, [stale]).shards[0].dir == "v000002-aaaaaaaa"
    unknown = result(9, "v000009-dddddddd")  # says no parent: cannot show it is current
    assert apply_results(manifest, [unknown]).shards[0].dir == "v000002-aaaaaaaa"
    current = result(3, "v000003-eeeeeeee", parent="v000002-aaaaaaaa")
    assert apply_results(manifest, [current]).shards[0].dir == "v000003-eeeeeeee"
    first = ShardBuildResult(1, 1, "v000001-ffffffff", 5, {"parent": None})  # from nothing
    assert apply_results(manifest, [first]).shards[1].dir == "v000001-ffffffff"


# ---- 1.3: a delete during the embedding job stays in force ---------------------------------------
def embedded_batch(ids: list[str], vectors: np.ndarray) -> pa.Table:
    """What the embedding stage hands ``write_parts``: rows that embedded fine."""
    n = len(ids)
    from pipelines.embed_stages import EMBEDDED_AT, MODEL_SECONDS

    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), DIM)
    return pa.table(
        {
            schema.ID: pa.array(ids, pa.string()),
            schema.URI: pa.array([f"file:///photos/{i}.jpg" for i in ids], pa.string()),
            schema.WIDTH: pa.array([64] * n, pa.int32()),
            schema.HEIGHT: pa.array([48] * n, pa.int32()),
            schema.EMBEDDING: column,
            schema.STAGE: pa.array([None] * n, pa.string()),
            schema.ERROR: pa.array([None] * n, pa.string()),
            EMBEDDED_AT: pa.array([time.time()] * n, pa.float64()),
            MODEL_SECONDS: pa.array([0.01] * n, pa.float64()),
        }
    )


def test_delete_between_plan_and_write_stays_in_force(tmp_path):
    """The job's stages by hand: plan, then a DELETE of a planned id, then the part is written
    (and written again, as a Ray Data retry would). The row stays hidden in a live view and
    after a rebuild, because it carries the plan's time, older than the delete."""
    from pipelines.embed_plan import PlanCounts, ShardSpill, plan_pending
    from pipelines.embed_stages import write_parts

    store, _ = local_store(tmp_path, 50)
    uris = [f"file:///photos/new-{i}.jpg" for i in range(8)]
    ids = [uri_id(u) for u in uris]
    spill = ShardSpill(1, str(tmp_path))
    spill.add_rows(uris, ids)
    spill.finish()
    pending = plan_pending(store, spill, PlanCounts(), failed=None, limit=None, block_rows=4)
    spill.close()
    assert pending.rows == 8 and pending.planned_at is not None
    _, deleted_at = write_tombstones(store, 0, [ids[3]])  # lands while the job embeds
    assert deleted_at > pending.planned_at

    batch = embedded_batch(ids, unit(np.random.default_rng(2), 8))
    for _ in range(2):  # the write, then a retry rewriting the same part
        write_parts(batch, store=store, num_shards=1, ingested_at=pending.planned_at)
    view = load_live_shard(store, 0, None, DIM, "ip")
    assert view.vector_of(ids[3]) is None and view.vector_of(ids[4]) is not None
    (part,) = store.list_parts(0)[-1:]
    written = store.read_parquet([store.path(part)])
    assert set(written[schema.INGESTED_AT].cast(pa.int64()).to_pylist()) == {pending.planned_at}
    rebuild_shard(store, 0)
    live = load_live_shard(store, 0, load_manifest(store).shards[0].dir, DIM, "ip")
    assert live.count == 50 + 7 and live.vector_of(ids[3]) is None


@pytest.mark.slow
def test_delete_during_a_real_embed_job_is_not_undone(
    ray_local, caltech_dir, tmp_path, monkeypatch
):
    """A real job on Ray: a DELETE of an image the job planned lands before its part is
    written; after the job and after a rebuild the image stays deleted."""
    from harness import embed_samples as samples
    from pipelines import embed
    from pipelines.embed_config import EmbedJobConfig

    photos = samples.caltech_subset(caltech_dir, 6)
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    root = tmp_path / "store"
    gone = [uri_id(str(p)) for p in photos[:2]]
    plan_job = embed.plan_job

    def plan_then_delete(ray_factory, store, config, num_shards, summary):
        pending = plan_job(ray_factory, store, config, num_shards, summary)
        for row_id in gone:  # the DELETEs arrive while the job has yet to write anything
            write_tombstones(store, shard_of(row_id, num_shards), [row_id])
        return pending

    monkeypatch.setattr(embed, "plan_job", plan_then_delete)
    config = EmbedJobConfig(input=[str(listing)], store=str(root), num_shards=1, batch_size=6)
    config.actors = 1
    summary = embed.run_job(config)
    assert summary.embedded == 6  # the job embedded them: it planned before the deletes
    store = Store(root)
    manifest = load_manifest(store)
    view = load_live_shard(store, 0, None, manifest.dim, manifest.metric)
    assert view.count == 4 and all(view.vector_of(i) is None for i in gone)
    rebuild_shard(store, 0)
    live = load_live_shard(store, 0, load_manifest(store).shards[0].dir, manifest.dim, "ip")
    assert live.count == 4 and all(live.vector_of(i) is None for i in gone)


# ---- 1.4: commits fail closed without a conditional create ---------------------------------------
class IgnoresCreate(MemoryFileSystem):
    """Accepts ``mode="create"`` and overwrites anyway (as obstore's fsspec adapter does)."""

    protocol = "vs-ignores-create"
    root_marker = "/"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        return super().pipe_file(path, value, **kwargs)


class NoCreate(MemoryFileSystem):
    """Refuses the ``mode`` argument outright (an older backend)."""

    protocol = "vs-no-create"
    root_marker = "/"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if mode != "overwrite":
            raise NotImplementedError(f"mode={mode!r}")
        return super().pipe_file(path, value, **kwargs)


@pytest.fixture
def odd_backends(monkeypatch):
    for cls in (IgnoresCreate, NoCreate):
        fsspec.register_implementation(cls.protocol, cls, clobber=True)
    monkeypatch.delenv(ENV_NONATOMIC_CREATE, raising=False)
    monkeypatch.setattr(store_module, "CREATE_PROBES", {})
    monkeypatch.setattr(store_module, "_WARNED_NONATOMIC", set())


def new_manifest(m: Manifest | None) -> Manifest:
    return m or Manifest("m", "w", DIM, 1)


@pytest.mark.parametrize("cls", [IgnoresCreate, NoCreate])
def test_commits_fail_closed_without_conditional_create(odd_backends, cls):
    store = Store(f"{cls.protocol}://vs-{uuid.uuid4().hex}/store")
    assert not store.is_local and store.conditional_create_problem() is not None
    with pytest.raises(NonAtomicCreateError, match=ENV_NONATOMIC_CREATE):
        commit_manifest(store, new_manifest)
    assert load_manifest(store) is None and store.ls(store.manifests_dir) == []
    assert store.ls(store.path(store_module.PROBE_DIR)) == []  # the probe cleaned up


@pytest.mark.parametrize("cls", [IgnoresCreate, NoCreate])
def test_opting_in_falls_back_to_check_then_write(odd_backends, monkeypatch, caplog, cls):
    """The fallback path: with the environment variable, or with the storage option (which
    travels with a pickled Store and never reaches fsspec), commits go through, and an existing
    manifest number is still refused; the risk is logged once."""
    root = f"{cls.protocol}://vs-{uuid.uuid4().hex}/store"
    by_option = Store(root, {OPTION_NONATOMIC_CREATE: True})
    assert OPTION_NONATOMIC_CREATE not in by_option.fs.storage_options
    by_option = pickle.loads(pickle.dumps(by_option))  # as a Ray task receives it
    with caplog.at_level(logging.WARNING, logger="index.storage.store"):
        first = commit_manifest(by_option, new_manifest)
        second = commit_manifest(by_option, new_manifest)
    assert second.sequence == first.sequence + 1
    assert sum("check-then-write" in r.getMessage() for r in caplog.records) == 1
    taken = f"{by_option.manifests_dir}/{first.sequence:06d}.json"
    with pytest.raises(FileExistsError):
        by_option.create_bytes(taken, b"{}")
    assert load_manifest(by_option).sequence == second.sequence  # nothing overwritten

    plain = Store(root)
    with pytest.raises(NonAtomicCreateError):
        commit_manifest(plain, new_manifest)
    monkeypatch.setenv(ENV_NONATOMIC_CREATE, "1")
    assert commit_manifest(plain, new_manifest).sequence == second.sequence + 1


def test_probe_tells_real_conditional_creates_from_the_rest(tmp_path, odd_backends):
    assert probe_conditional_create(MemoryFileSystem(), f"/probe-{uuid.uuid4().hex}") is None
    assert "replaced it" in probe_conditional_create(IgnoresCreate(), f"/probe-{uuid.uuid4().hex}")
    assert "not supported" in probe_conditional_create(NoCreate(), f"/probe-{uuid.uuid4().hex}")
    # fsspec's generic pipe_file checks, then writes: it refuses a second create, but racily
    generic = probe_conditional_create(LocalFileSystem(), str(tmp_path / "probe"))
    assert generic is not None and "check-then-write" in generic


def test_s3_passes_the_probe_and_commits_atomically(s3_server, s3_store_uri, monkeypatch):
    monkeypatch.setattr(store_module, "CREATE_PROBES", {})
    monkeypatch.delenv(ENV_NONATOMIC_CREATE, raising=False)
    store = Store(s3_store_uri, s3_server.storage_options)
    first = commit_manifest(store, new_manifest)
    assert store.conditional_create_problem() is None  # If-None-Match on moto's S3
    assert list(store_module.CREATE_PROBES.values()) == [None]  # probed once, remembered
    assert store.ls(store.path(store_module.PROBE_DIR)) == []
    with pytest.raises(FileExistsError):
        store.create_bytes(f"{store.manifests_dir}/{first.sequence:06d}.json", b"{}")
    assert commit_manifest(store, new_manifest).sequence == first.sequence + 1


# ---- 1.8: one unreadable part does not stall a shard ---------------------------------------------
def test_an_unreadable_part_is_retried_alone(tmp_path):
    store, _ = local_store(tmp_path, 200)
    rebuild_shard(store, 0)
    live = load_manifest(store).shards[0].dir
    rng = np.random.default_rng(3)
    tables = [rows_table(f"new{k}", unit(rng, 5)) for k in range(3)]
    parts = [write_rows(store, 0, t) for t in tables]
    store.write_bytes(store.path(parts[1]), b"PAR1 torn in half")  # a torn or foreign file

    view = load_live_shard(store, 0, live, DIM, "ip")  # the refresh inside does not raise
    for k in (0, 2):
        assert all(view.vector_of(i) is not None for i in tables[k][schema.ID].to_pylist())
    assert view.vector_of("new1-0000") is None
    assert list(view.stats()["unreadable_parts"]) == [parts[1]]
    assert view.refresh() == 0  # still unreadable; the good parts are not read again

    store.write_parquet(tables[1], store.path(parts[1]))  # rewritten whole
    assert view.refresh() == 1
    assert all(view.vector_of(i) is not None for i in tables[1][schema.ID].to_pylist())
    assert view.stats()["unreadable_parts"] == {} and view.count == 200 + 15


def test_an_unreadable_tombstone_part_holds_back_new_rows_only(tmp_path):
    """Deletes are never undone by a failed read: while a tombstone part cannot be read, rows
    that arrived with it wait (they could be the rows it hides); other tombstones apply."""
    store, _ = local_store(tmp_path, 200)
    rebuild_shard(store, 0)
    view = load_live_shard(store, 0, load_manifest(store).shards[0].dir, DIM, "ip")
    added = rows_table("late", unit(np.random.default_rng(4), 4))
    write_rows(store, 0, added)
    bad, _ = write_tombstones(store, 0, ["late-0000"])
    good, _ = write_tombstones(store, 0, ["base-0007"])
    kept = store.read_bytes(store.path(bad))
    store.write_bytes(store.path(bad), b"garbage")

    assert view.refresh() == 1  # the good tombstone
    assert view.vector_of("base-0007") is None
    assert view.vector_of("late-0001") is None  # waits with the unreadable tombstone part
    assert list(view.stats()["unreadable_parts"]) == [bad]

    store.write_bytes(store.path(bad), kept)
    assert view.refresh() == 2  # the tombstone part, then the rows
    assert view.vector_of("late-0000") is None and view.vector_of("late-0001") is not None
    assert view.count == 200 - 1 + 3 and good in view._tomb_parts


# ---- 1.11: the rebuild command collects its own garbage when asked to wait -----------------------
def test_rebuild_command_waits_out_the_grace_and_collects(tmp_path, capsys):
    from pipelines import rebuild as rebuild_cli

    store, _ = local_store(tmp_path, 300)
    rebuild_shard(store, 0)
    write_rows(store, 0, rows_table("more", unit(np.random.default_rng(5), 20)))
    args = ["--store", str(store.root), "--grace-s", "0.5", "--gc-wait-s", "30"]
    assert rebuild_cli.main(args) == 0
    live = load_manifest(store).shards[0].dir
    assert list_versions(store, 0) == [live]  # the old version went once its grace passed
    assert store.list_parts(0) == []  # and the parts the new version folded in
    assert "still waiting" not in capsys.readouterr().out


def test_a_build_never_reads_the_tombstone_parts_the_live_version_applied(tmp_path):
    """Found by the history checker (``benchmarks/histories.py`` seeds 3, 6, 24, 27): a
    command-line build listed a tombstone part the live version had applied, the Rebuilder's
    GC retired it (as it may, once that version is live), and the build failed reading it.
    Those deletes are in the live version's ``tombstones.parquet``: the build reads that and
    only the parts it did not apply, so the retired part is not missed and the deletes hold."""
    from index.live import rebuild as rebuild_module
    from index.storage.coverage import plan_shard

    store, _ = local_store(tmp_path, 300)
    write_tombstones(store, 0, ["base-0000"])
    rebuild_shard(store, 0)  # V1 applies the first delete
    applied = store.list_tombstone_parts(0)
    write_tombstones(store, 0, ["base-0001"])  # not applied yet
    plan = plan_shard(store, 0)
    assert plan.tombstone_parts != plan.new_tombstones and len(plan.new_tombstones) == 1
    store.rm(store.path(applied[0]))  # GC retires it after the plan listed it
    deleted = rebuild_module.read_tombstones(store, plan)[schema.ID].to_pylist()
    assert sorted(deleted) == ["base-0000", "base-0001"]
    write_tombstones(store, 0, ["base-0002"])
    summary = rebuild_shard(store, 0, RebuildOptions(force=True))
    view = load_live_shard(store, 0, summary["dir"], DIM, "ip")
    assert summary["built"] and view.count == 297
    assert all(view.vector_of(f"base-{i:04d}") is None for i in range(3))
