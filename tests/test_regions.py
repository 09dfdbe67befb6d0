"""Region rows (``embed --regions``): a grid of crops per image, stored under the image's id.

The grid and its ids (``index.rows.regions``), the embedding job's crops of it, a search that
answers images (best region, and which one) and a delete that hides every region of the image.
The job end to end with regions: ``tests/test_embed_job.py`` (with ``--dedup``, one job for
both); crops finding their photos on real embeddings: ``benchmarks/regions.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from embedding.preprocess import CropSpec, crop_box, prepare
from harness.stores import write_store
from index.live.parts import read_tombstones
from index.live.rebuild import rebuild_shard
from index.query.hits import Hit
from index.query.merge import merge_topk
from index.query.region_hits import fetch_rows, to_images
from index.rows import regions
from index.rows.sharding import shard_of
from index.storage.manifest import commit_manifest, load_manifest
from pipelines.embed_stages import read_decode_batch
from serve.catalog import Catalog
from serve.deployments.searcher import ShardSearcher
from serve.http.errors import ApiError
from serve.http.validate import validate_id
from serve.planner import Answer
from serve.writes import RowWriter

DIM = 16


def test_the_grid_its_ids_and_boxes():
    assert [regions.per_image(levels) for levels in (1, 2, 3, 4)] == [1, 5, 14, 30]
    for level, row, col in regions.cells(4):
        x0, y0, x1, y1 = regions.cell_box(level, row, col)
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert x1 - x0 == pytest.approx(2 / (level + 1), abs=1e-3)  # R-MAC's cell side
    # the cells of one level tile the image with overlap, the last one flush with the edge
    assert regions.cell_box(3, 2, 2)[2:] == (1.0, 1.0)
    rid = regions.region_id("photo-7", 3, 1, 2)
    assert rid == "photo-7@r3.1.2"
    assert regions.parent_of(rid) == "photo-7" and regions.parent_of("photo-7") == "photo-7"
    assert regions.box_of(rid) == (0.5, 0.25, 1.0, 0.75)  # x from the column, y the row
    assert regions.box_of("photo-7") is None
    assert regions.parent_of("a@rX") == "a@rX"  # only the exact mark makes a region id
    assert regions.region_ids("p", 2) == ["p@r2.0.0", "p@r2.0.1", "p@r2.1.0", "p@r2.1.1"]
    # an image's regions live in its shard (its delete and collapse stay on one shard)
    for i in range(50):
        image = f"img-{i}"
        assert {shard_of(r, 7) for r in regions.region_ids(image, 3)} == {shard_of(image, 7)}
    with pytest.raises(ValueError, match="1..6"):
        regions.check_levels(0)
    # an added image's id may not look like a region's; reads may name one
    with pytest.raises(ApiError, match="@r"):
        validate_id("x@r2.0.1", new=True)
    assert validate_id("x@r2.0.1") == "x@r2.0.1"


def test_the_job_crops_every_cell_of_each_decoded_image(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    path = tmp_path / "a.png"  # PNG: no JPEG draft, so the expected crops are exact
    Image.fromarray(pixels).save(path)
    batch = pa.table({"id": ["a", "missing"], "uri": [str(path), str(tmp_path / "no.png")]})
    spec = CropSpec(32)
    out = read_decode_batch(
        batch, max_pixels=10**7, max_bytes=10**7, crop=spec.to_dict(), regions=2
    ).to_pydict()
    assert out["id"] == ["a", *regions.region_ids("a", 2), "missing"]
    assert out["stage"] == [None] * 5 + ["read"]  # a failed input is one error row, not five
    assert out["width"][:5] == [120] * 5 and out["uri"][:5] == [str(path)] * 5
    img = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
    for row_id, crop in zip(out["id"][:5], out["crop"][:5], strict=True):
        box = regions.box_of(row_id) or (0.0, 0.0, 1.0, 1.0)
        expected = prepare(crop_box(img, box), spec)
        np.testing.assert_array_equal(np.asarray(crop, np.uint8).reshape(32, 32, 3), expected)


@pytest.fixture
def region_store(tmp_path):
    """30 images with 2-level regions (5 rows each) in 2 shards, built; the manifest says 2."""
    rng = np.random.default_rng(3)
    images = [f"img-{i:02d}" for i in range(30)]
    ids = [row for image in images for row in [image, *regions.region_ids(image, 2)]]
    x = rng.standard_normal((len(ids), DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    uris = [f"mem://{regions.parent_of(i)}" for i in ids]
    store = write_store(tmp_path / "s", ids, uris, x, 2)
    commit_manifest(store, lambda m: dataclasses.replace(m, regions=2))
    for shard in (0, 1):
        rebuild_shard(store, shard)
    return store, ids, x


def test_a_search_answers_images_by_their_best_region_and_a_delete_hides_them_all(region_store):
    store, ids, x = region_store
    target = ids.index("img-07@r2.1.0")
    # merge_topk keeps each image's best cell once the cells carry the image's id
    hits = [Hit("img-01@r2.0.0", "u", 0.9), Hit("img-01", "u", 0.5), Hit("img-02", "v", 0.7)]
    merged = merge_topk([to_images(hits)], 5, "ip")
    assert [(h.id, h.region) for h in merged] == [
        ("img-01", regions.box_of("img-01@r2.0.0")),
        ("img-02", None),
    ]
    assert fetch_rows(10, 1) == 10 and fetch_rows(10, 5) == 50 and fetch_rows(10, 30) == 80

    async def run():
        searcher = ShardSearcher.func_or_class(
            store.uri, [0, 1], reload_interval_s=0, delta_poll_s=0.05, batch_wait_s=0
        )
        try:
            found = await searcher.search(x[target], 10)
            catalog = Catalog(store, load_manifest(store))
            shard = shard_of("img-07", 2)

            async def hand_over(method, s, *args):
                return searcher._holder(s).hand_over(method, *args)

            writer = RowWriter(
                store,
                catalog,
                lambda s, *a: hand_over("add_rows", s, *a),
                lambda s, *a: hand_over("add_tombstones", s, *a),
                searcher.stamp,
                deadline_s=5,
            )
            deleted = await writer.delete("img-07")
            after = await searcher.search(x[target], 10)
            exact = await searcher.search_exact(x[target], 10)
            return found, shard, deleted, after, exact
        finally:
            searcher._stop.set()

    found, shard, deleted, after, exact = asyncio.run(run())
    assert found["ids"][0] == "img-07" and found["regions"][0] == (0.0, 0.3333, 0.6667, 1.0)
    assert len(found["ids"]) == len(set(found["ids"])) == 10  # ten images, not ten rows
    assert not any(regions.SEPARATOR in i for i in found["ids"])
    hits = [
        Hit(i, "", 1.0, 0, None, r) for i, r in zip(found["ids"], found["regions"], strict=True)
    ]
    answer = Answer(hits, [], [], [])
    assert answer.results(2)[0]["region"] == [0.0, 0.3333, 0.6667, 1.0]
    # one tombstone part for the image and its 4 regions, applied by the shard at once
    assert deleted["hidden"] and deleted["shard"] == shard
    tombstoned, _ = read_tombstones(store, deleted["part"])
    assert sorted(tombstoned) == sorted(["img-07", *regions.region_ids("img-07", 2)])
    assert "img-07" not in after["ids"] and "img-07" not in exact["ids"]
    assert exact["ids"][0] == after["ids"][0]  # the exact reference collapses the same way


def test_the_client_cuts_a_box_out_of_the_query_image():
    from visual_search.client import cut_box
    from visual_search.query_cli import _box

    buf = io.BytesIO()
    Image.new("RGB", (200, 100), (10, 20, 30)).save(buf, "JPEG")
    part = Image.open(io.BytesIO(cut_box(buf.getvalue(), (0.25, 0.5, 0.75, 1.0))))
    assert part.size == (100, 50) and part.format == "PNG"
    assert _box("0.2,0.1,0.6,0.5") == (0.2, 0.1, 0.6, 0.5)
    for bad in ("0.5,0,0.4,1", "0,0,1", "a,b,c,d", "0,0,1.5,1"):
        with pytest.raises(Exception, match="X0|four|need"):
            _box(bad)
    with pytest.raises(ValueError, match="box"):
        cut_box(buf.getvalue(), (0.6, 0, 0.4, 1))
