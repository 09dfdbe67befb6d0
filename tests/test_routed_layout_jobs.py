"""The routed layout's jobs (``index.ann.routing``): the relayout job on Ray, the embedding job's
write stage and its skip-existing plan against a routed store. Real stores, real Parquet.

- ``route_store`` copies a hash store (two generations of parts, one of them compacted by a
  build, re-added ids, deletes before and after the build, region rows whose own vectors lie
  elsewhere) into 8 routed shards: every visible row once, in its router shard, region rows
  with their image, metadata and stamps kept, deletes carried (but never one that would hide a
  visible row), and ``build_index`` builds the copy.
  The command (``visual-search route``) rebalances the copy into 4 shards and says how.
- ``write_parts`` into a routed store places rows by vector, and region rows whose image row
  fell into the previous write batch join it once ``place_orphans`` runs.
- ``plan_pending`` against a routed store skips ids stored (or deleted) in any shard.
- The embedding job itself on Ray into a routed store with regions, write batches that cut
  images apart: rows by vector, regions with their image, a re-run embeds nothing.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from harness.stores import read_store, write_store
from harness.synthetic import gaussian_mixture, synthetic_rows
from index.ann.routing import load_router, train_router
from index.ann.shard_index import ShardIndex
from index.live.parts import write_tombstones
from index.live.rebuild import rebuild_shard
from index.rows import schema
from index.rows.regions import parent_of, region_ids
from index.rows.sharding import shard_of, uri_id
from index.storage.manifest import commit_manifest, load_manifest
from index.storage.store import Store
from pipelines.build_index import BuildConfig
from pipelines.build_index import run as build_index
from pipelines.embed_plan import PlanCounts, ShardSpill, plan_pending
from pipelines.embed_stages import EMBEDDED_AT, MODEL_SECONDS, write_parts
from pipelines.route_store import RouteError, route_store
from pipelines.shard_parts import ROUTED_STAGING, place_orphans
from visual_search.cli import main as cli

DIM = 32


def with_regions(store: Store, levels: int = 2) -> None:
    def update(m):
        m.regions = levels
        return m

    commit_manifest(store, update)


def rows_by_id(root) -> dict[str, dict]:
    """Every stored row of a store by id (asserting each id is stored once)."""
    rows, _ = read_store(root)
    assert len(rows["id"]) == len(set(rows["id"])), "an id stored twice"
    return {
        i: {"shard": s, "vec": v, "uri": u}
        for i, s, v, u in zip(rows["id"], rows["shard"], rows["vec"], rows["uri"], strict=True)
    }


# ---- the relayout job ---------------------------------------------------------------------------
@pytest.mark.slow
def test_route_store_copies_visible_rows_by_vector_and_builds(ray_local, tmp_path, capsys):
    n_images = 3000
    vectors = gaussian_mixture(n_images + 400, DIM, clusters=40, seed=3)
    ids, uris = synthetic_rows(n_images)
    label = pa.table({"label": pa.array(np.arange(n_images) % 7, pa.int64())})
    # 100 images with region rows whose vectors are other images' (so they route elsewhere)
    with_cells = ids[:100]
    region_rows = [r for i in with_cells for r in region_ids(i, 2)]
    region_vecs = vectors[n_images : n_images + len(region_rows)]
    src = write_store(
        tmp_path / "src",
        ids + region_rows,
        uris + [f"{uris[ids.index(parent_of(r))]}#{r[-5:]}" for r in region_rows],
        np.concatenate([vectors[:n_images], region_vecs]),
        4,
        metadata=pa.concat_tables(
            [label, pa.table({"label": pa.array([None] * len(region_rows), pa.int64())})]
        ),
        part_key="g0",
    )
    with_regions(src)
    deleted_early = ids[100:130]  # applied by the build, kept in its tombstones.parquet
    for row_id in deleted_early:
        write_tombstones(src, shard_of(row_id, 4), [row_id])
    deleted_image = ids[0]  # an image with region rows: its regions go too
    write_tombstones(
        src, shard_of(deleted_image, 4), [deleted_image, *region_ids(deleted_image, 2)]
    )
    for shard in range(4):
        rebuild_shard(src, shard)  # base parts and a live version's tombstones
    readded = ids[200:260]  # a newer copy with another vector wins
    new_vecs = gaussian_mixture(60, DIM, clusters=40, seed=11)
    write_store(src, readded, uris[200:260], new_vecs, 4, part_key="g1")
    deleted_late = ids[300:320]  # tombstone parts the live version has not applied
    for row_id in deleted_late:
        write_tombstones(src, shard_of(row_id, 4), [row_id])
    # a routed write's tombstone in another shard at the row's own stamp: the row stays
    stamped = ids[400]
    home = shard_of(stamped, 4)
    base = src.read_parquet([src.path(p) for p in src.list_base_parts(home)])
    hit = base.filter(pc.equal(base[schema.ID], stamped))
    stamped_ms = hit[schema.INGESTED_AT].cast(pa.int64())[0].as_py()
    write_tombstones(src, (home + 1) % 4, [stamped], deleted_at_ms=stamped_ms)

    gone = {*deleted_early, *deleted_late, deleted_image, *region_ids(deleted_image, 2)}
    expected = {*ids, *region_rows} - gone
    dst = Store(tmp_path / "dst")
    summary = route_store(src, dst, 8, cells_per_shard=4, progress=False)

    manifest = load_manifest(dst)
    source = load_manifest(src)
    assert manifest.layout == "routed" and manifest.num_shards == 8
    assert (manifest.model, manifest.weights, manifest.dim, manifest.metric) == (
        source.model,
        source.weights,
        source.dim,
        source.metric,
    )
    assert (manifest.regions, manifest.metadata, manifest.id_scheme) == (2, {"label": "int"}, "uri")
    router = load_router(dst, manifest)
    assert router.num_shards == 8 and manifest.router == summary.router

    stored = rows_by_id(dst.root)
    assert set(stored) == expected  # every visible row once, nothing hidden or deleted
    assert summary.rows == len(expected) == sum(summary.shard_rows)
    assert summary.hidden >= len(readded)  # the older copies of the re-added ids
    assert summary.sample == n_images - len(deleted_early) - len(deleted_late) - 1
    for i, row_id in enumerate(readded):  # the newest copy, not the compacted one
        np.testing.assert_allclose(stored[row_id]["vec"], new_vecs[i], atol=1e-6)
    images = [i for i in stored if parent_of(i) == i]
    vecs = np.stack([stored[i]["vec"] for i in images])
    np.testing.assert_array_equal(
        [stored[i]["shard"] for i in images], router.shards_of(vecs)
    )  # each image row in its vector's shard
    regions = [r for r in stored if parent_of(r) != r]
    assert len(regions) == 99 * 4
    assert all(stored[r]["shard"] == stored[parent_of(r)]["shard"] for r in regions)
    own = router.shards_of(np.stack([stored[r]["vec"] for r in regions]))
    assert (own != [stored[r]["shard"] for r in regions]).sum() > 50  # they moved, with intent
    counts = np.bincount([row["shard"] for row in stored.values()], minlength=8)
    assert counts.tolist() == summary.shard_rows and counts.min() > 0
    assert 1 <= summary.default_probe <= 8 and len(summary.coverage) == 8
    assert summary.coverage[-1] == pytest.approx(1.0)
    # every column kept: metadata and the original stamps
    parts = [dst.path(p) for s in range(8) for p in dst.list_parts(s)]
    copied = dst.read_parquet(parts)
    by_id = dict(zip(copied[schema.ID].to_pylist(), copied["label"].to_pylist(), strict=True))
    assert by_id[ids[5]] == 5 and by_id[region_ids(ids[5], 2)[0]] is None
    stamps = dict(
        zip(
            copied[schema.ID].to_pylist(),
            copied[schema.INGESTED_AT].cast(pa.int64()).to_pylist(),
            strict=True,
        )
    )
    assert stamps[stamped] == stamped_ms
    # deletes carried to the id's hash shard, except the one whose row is visible
    carried = {
        i
        for s in range(8)
        for p in dst.list_tombstone_parts(s)
        for i in dst.read_parquet([dst.path(p)])[schema.ID].to_pylist()
    }
    assert carried == gone and summary.deletes == len(gone)
    assert not dst.ls(dst.path("_staging"))

    with pytest.raises(RouteError, match="not empty"):
        route_store(src, dst, 8, progress=False)
    with pytest.raises(RouteError, match="both"):
        route_store(src, src, 8, progress=False)

    built = build_index(BuildConfig(store=str(dst.root), num_cpus=0.5, progress=False))
    assert len(built.built) == 8 and not built.failed
    assert built.vectors == len(expected)  # no carried delete hid a row
    loaded = [ShardIndex.load(dst, s) for s in range(8)]
    assert sum(s.count for s in loaded) == len(expected)

    # the command: visual-search route SRC DST --shards N (a rebalance of the routed copy)
    again = tmp_path / "rebalanced"
    argv = ["route", str(dst.root), str(again), "--shards", "4", "--cells-per-shard", "4"]
    assert cli([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    probe = load_router(Store(again), load_manifest(Store(again))).default_probe
    assert (
        f"default probe {probe} shard(s)" in out and "top-10 coverage by shards probed: 1: " in out
    )
    assert f"routed {len(expected):,} rows" in out and "shard sizes: 0: " in out
    assert set(rows_by_id(again)) == expected
    assert cli([*argv, "--no-progress"]) == 2 and "not empty" in capsys.readouterr().err


# ---- the embedding job's write stage and plan --------------------------------------------------
def embedded_batch(ids: list[str], vectors: np.ndarray, failed: set[str] = frozenset()) -> pa.Table:
    """What the model stage hands ``write_parts`` (rows in ``failed`` failed to decode)."""
    n = len(ids)
    ok = np.array([i not in failed for i in ids])
    column = pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1), pa.float32()), DIM, mask=pa.array(~ok)
    )
    return pa.table(
        {
            schema.ID: pa.array(ids, pa.string()),
            schema.URI: pa.array([f"file:///p/{parent_of(i)}.jpg" for i in ids], pa.string()),
            schema.WIDTH: pa.array([64] * n, pa.int32()),
            schema.HEIGHT: pa.array([48] * n, pa.int32()),
            schema.EMBEDDING: column,
            schema.STAGE: pa.array([None if k else "decode" for k in ok], pa.string()),
            schema.ERROR: pa.array([None if k else "bad" for k in ok], pa.string()),
            EMBEDDED_AT: pa.array([time.time()] * n, pa.float64()),
            MODEL_SECONDS: pa.array([0.01] * n, pa.float64()),
        }
    )


@pytest.fixture
def routed_store(tmp_path):
    """A routed store of 4 shards and regions=2, holding 200 images; its router."""
    sample = gaussian_mixture(2000, DIM, clusters=20, seed=1)
    router = train_router(sample, 4, "ip", cells_per_shard=4)
    ids, uris = synthetic_rows(200)
    store = write_store(
        tmp_path / "routed", ids, uris, gaussian_mixture(200, DIM, clusters=20, seed=2), 4,
        router=router,
    )  # fmt: skip
    with_regions(store)
    return store, router


def test_write_parts_places_rows_by_vector_and_regions_with_their_image(routed_store):
    store, router = routed_store
    images = [uri_id(f"file:///p/new-{i}.jpg") for i in range(60)]
    ids = [r for i in images for r in [i, *region_ids(i, 2)]]
    vectors = gaussian_mixture(len(ids), DIM, clusters=20, seed=4)  # regions' own vectors: apart
    failed = {images[7]}  # an image that failed: one error row, no regions
    ids = [i for i in ids if parent_of(i) not in failed or i in failed]
    vectors = vectors[: len(ids)]
    staging = store.path("_staging", "embed-test")
    cut = 5 * 30 + 2 - 4  # image 30 and one of its cells in the first batch, 3 cells in the next
    first = embedded_batch(ids[:cut], vectors[:cut], failed)
    second = embedded_batch(ids[cut:], vectors[cut:], failed)
    for batch in (first, second, second):  # the second batch retried: the same parts again
        out = write_parts(
            batch, store=store, num_shards=4, ingested_at=1_000, router=router, staging=staging,
            regions=2,
        )  # fmt: skip
    assert out["errors"].to_pylist() == [0] and out["rows"].to_pylist() == [len(ids) - cut]
    split = images[30]
    assert store.ls(f"{staging}/{ROUTED_STAGING}/orphans")  # the cut image's cells wait there
    before = rows_by_id(store.root)
    assert split in before and not set(region_ids(split, 2)[1:]) & set(before)
    assert place_orphans(store, staging, router) >= 1

    stored = rows_by_id(store.root)
    new = {i: row for i, row in stored.items() if parent_of(i) in images}
    assert set(new) == set(ids) - failed  # each written once, the failed input not
    want = dict(zip(ids, router.shards_of(vectors), strict=True))
    for row_id, row in new.items():
        if parent_of(row_id) == row_id:
            assert row["shard"] == want[row_id]  # the image row: its vector's shard
        else:
            assert row["shard"] == new[parent_of(row_id)]["shard"]  # a region: its image's
    moved = [r for r in new if parent_of(r) != r and want[r] != new[r]["shard"]]
    assert len(moved) > 20  # regions whose own vectors lie in another shard stayed with theirs
    assert {shard_of(i, 4) == row["shard"] for i, row in new.items()} == {True, False}
    errors = store.read_parquet(store.list_error_parts())
    assert errors[schema.ID].to_pylist() == [images[7]]


@pytest.mark.parametrize("bucket_rows", [65_536, 5])  # whole buckets, and buckets of 5 inputs
def test_plan_against_a_routed_store_skips_ids_stored_in_any_shard(
    routed_store, tmp_path, monkeypatch, bucket_rows
):
    from pipelines import embed_plan

    monkeypatch.setattr(embed_plan, "BUCKET_ROWS", bucket_rows)
    store, _ = routed_store
    ids, uris = synthetic_rows(200)
    stored = rows_by_id(store.root)
    elsewhere = [i for i in ids if stored[i]["shard"] != shard_of(i, 4)]
    assert len(elsewhere) > 100  # most ids are not in their hash shard: the old plan misses them
    _, new_uris = synthetic_rows(30, start=200)
    deleted = uri_id(new_uris[0])  # a delete in one shard that is not the id's hash shard
    write_tombstones(store, (shard_of(deleted, 4) + 1) % 4, [deleted])
    spill = ShardSpill(4, str(tmp_path))
    counts = PlanCounts()
    inputs = uris[::2] + new_uris
    counts.inputs = len(inputs)
    spill.add_rows(inputs, [uri_id(u) for u in inputs])
    spill.finish()
    pending = plan_pending(store, spill, counts, failed=None, limit=None, block_rows=8)
    spill.close()
    assert counts.skipped_present == 100 + 1 and counts.pending == pending.rows == 29
    staged = store.read_parquet([f[1] for f in pending.files])
    assert sorted(staged[schema.URI].to_pylist()) == sorted(new_uris[1:])
    assert counts.store_duplicates == 0


@pytest.mark.slow
def test_embed_job_into_a_routed_store(ray_local, caltech_dir, tmp_path):
    from harness import embed_samples as samples
    from pipelines.embed import run_job
    from pipelines.embed_config import EmbedJobConfig

    photos = [str(p) for p in samples.caltech_subset(caltech_dir, 24)]
    first, later = tmp_path / "first.txt", tmp_path / "later.txt"
    first.write_text("".join(f"{p}\n" for p in photos[:12]))
    later.write_text("".join(f"{p}\n" for p in photos))
    hashed = tmp_path / "hashed"
    job = {"actors": 1, "batch_size": 8, "regions": 2}
    assert run_job(EmbedJobConfig(input=[str(first)], store=str(hashed), **job)).embedded == 12
    routed = Store(tmp_path / "routed")
    route_store(Store(hashed), routed, 2, cells_per_shard=1, progress=False)

    # 7-row write batches: 5 rows an image, so most batches cut an image's rows apart
    summary = run_job(
        EmbedJobConfig(input=[str(later)], store=str(routed.root), part_rows=7, **job)
    )
    assert (summary.embedded, summary.skipped_present, summary.errors) == (12, 12, 0)
    manifest = load_manifest(routed)
    assert manifest.layout == "routed" and manifest.num_shards == 2
    router = load_router(routed, manifest)
    stored = rows_by_id(routed.root)
    ids = [uri_id(p) for p in photos]
    assert set(stored) == {r for i in ids for r in [i, *region_ids(i, 2)]}
    images = np.stack([stored[i]["vec"] for i in ids])
    assert [stored[i]["shard"] for i in ids] == router.shards_of(images).tolist()
    assert all(stored[r]["shard"] == stored[parent_of(r)]["shard"] for r in stored)
    assert not routed.ls(routed.path("_staging"))
    again = run_job(EmbedJobConfig(input=[str(later)], store=str(routed.root), **job))
    assert (again.embedded, again.skipped_present) == (0, 24)
