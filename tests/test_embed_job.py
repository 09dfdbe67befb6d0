"""The embedding job on a real in-process Ray (``ray_local``), real photos, a real store."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import embed_samples as samples
from harness.stores import read_store
from index.rows import regions
from index.rows.sharding import content_id, shard_of, uri_id
from index.storage.manifest import ManifestMismatch, load_manifest
from index.storage.store import Store
from pipelines.embed import run_job
from pipelines.embed_config import EmbedJobConfig

N_PHOTOS = 240  # 3 photos from each class in turn (80 of Caltech-101's; 21 of the generated tree)


def read_errors(root: Path) -> list[dict]:
    store = Store(root)
    parts = store.list_error_parts()
    return store.read_parquet(parts).to_pylist() if parts else []


@pytest.mark.slow
def test_caltech_photos_end_to_end_and_rerun_is_a_no_op(ray_local, caltech_dir, tmp_path):
    photos = samples.caltech_subset(caltech_dir, N_PHOTOS)
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    root = tmp_path / "store"
    config = EmbedJobConfig(
        input=[str(listing)],
        store=str(root),
        num_shards=3,
        batch_size=16,
        actors=2,
        part_rows=40,  # small, to see how rows group into parts
    )
    summary = run_job(config)
    assert (summary.embedded, summary.errors, summary.skipped_present) == (N_PHOTOS, 0, 0)
    assert summary.images_per_s > 0 and "embedded 240 images" in summary.line()

    manifest = load_manifest(Store(root))
    assert (manifest.model, manifest.dim, manifest.num_shards, manifest.metric) == (
        "efficientnet_lite0",
        1280,
        3,
        "ip",
    )
    assert manifest.weights.startswith("imagenet:")
    rows, parts = read_store(root)
    uris = [str(p) for p in photos]
    assert sorted(rows["uri"]) == sorted(uris)  # every photo, exactly once
    assert len(set(rows["id"])) == N_PHOTOS
    assert all(i == uri_id(u) for i, u in zip(rows["id"], rows["uri"], strict=True))
    assert all(s == shard_of(i, 3) for i, s in zip(rows["id"], rows["shard"], strict=True))
    assert set(rows["shard"]) == {0, 1, 2}
    # inputs are staged in shard order, so parts hold one shard's rows, about part_rows each
    # (one part per shard per 40-row write batch would be ~18 parts of ~13 rows)
    assert summary.parts == len(parts) <= N_PHOTOS // 40 + 2 * 3, parts
    assert Store(root).ls(str(root / "_staging")) == []  # the run's staging files are gone
    vecs = rows["vec"]
    assert vecs.shape == (N_PHOTOS, 1280) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    for uri, w, h in list(zip(rows["uri"], rows["w"], rows["h"], strict=True))[:10]:
        assert Image.open(uri).size == (w, h)
    # The vectors mean something: a photo's nearest other photo is mostly of its own class
    # (chance would be 1 in the number of classes: 80 here on Caltech-101, 21 generated).
    labels = [Path(u).parent.name for u in rows["uri"]]
    assert len(set(labels)) >= 20
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(1)
    accuracy = np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)])
    assert accuracy > 0.4, accuracy

    mtimes = {p: os.stat(Store(root).path(p)).st_mtime_ns for p in parts}
    again = run_job(config)
    assert (again.embedded, again.skipped_present, again.errors) == (0, N_PHOTOS, 0)
    assert "0 images" in again.line() and again.seconds == 0.0  # no Ray work at all
    _, parts_after = read_store(root)
    assert {p: os.stat(Store(root).path(p)).st_mtime_ns for p in parts_after} == mtimes

    # The store refuses what it cannot mix: another sharding, another model's vectors.
    with pytest.raises(ManifestMismatch, match="shards"):
        run_job(EmbedJobConfig(input=[str(listing)], store=str(root), num_shards=4))
    with pytest.raises(ManifestMismatch, match="refusing"):
        run_job(EmbedJobConfig(input=[str(listing)], store=str(root), weights="none"))


@pytest.mark.slow
def test_bad_inputs_are_counted_recorded_and_never_fail_the_job(ray_local, caltech_dir, tmp_path):
    real = samples.class_photos(caltech_dir)
    bad = samples.bad_files(real[0].read_bytes())
    odd = samples.odd_valid_files()
    folder = tmp_path / "in"
    samples.write_files(folder, {k: v[0] for k, v in bad.items()})
    samples.write_files(folder, odd)
    samples.link_images(real[:5], folder)
    (tmp_path / "a-folder.jpg").mkdir()
    listing = tmp_path / "more.txt"
    listing.write_text("vanished.jpg\na-folder.jpg\n")
    root = tmp_path / "store"
    config = EmbedJobConfig(
        input=[str(folder), str(listing)], store=str(root), batch_size=8, actors=1
    )
    summary = run_job(config)
    n_bad = len(bad) + 2
    assert summary.inputs == len(bad) + len(odd) + 5 + 2
    assert (summary.embedded, summary.errors) == (len(odd) + 5, n_bad)
    assert summary.error_stages == {"decode": len(bad), "read": 2}

    rows, _ = read_store(root)
    embedded = Counter(os.path.basename(u) for u in rows["uri"])
    assert all(embedded[name] == 1 for name in odd)  # greyscale, CMYK, 16-bit, alpha, palette...
    assert np.isfinite(rows["vec"]).all()
    errors = {os.path.basename(e["uri"]): e for e in read_errors(root)}
    assert len(errors) == n_bad
    for name, (_, reason) in bad.items():
        assert errors[name]["stage"] == "decode" and errors[name]["error"].startswith(reason)
        assert errors[name]["id"] == uri_id(str(folder / name))
    assert errors["vanished.jpg"]["stage"] == "read"
    assert "FileNotFoundError" in errors["vanished.jpg"]["error"]
    assert "IsADirectoryError" in errors["a-folder.jpg"]["error"]

    # A re-run skips what is stored and what failed before; --retry-errors tries failures again.
    again = run_job(config)
    assert (again.embedded, again.errors) == (0, 0)
    assert (again.skipped_present, again.skipped_failed) == (len(odd) + 5, n_bad)
    retried = run_job(EmbedJobConfig(**{**vars(config), "retry_errors": True}))
    assert (retried.embedded, retried.errors) == (0, n_bad)
    assert len({e["uri"] for e in read_errors(root)}) == n_bad


@pytest.mark.slow
def test_dedup_gives_one_image_per_picture_and_regions_a_row_per_cell(
    ray_local, caltech_dir, tmp_path
):
    """One job for two id features: ``--dedup`` (one image per picture, named by its bytes)
    and ``--regions 2`` (each image's own row and a row per cell of its 2x2 grid, all in the
    image's shard; the store keeps its grid)."""
    real = samples.class_photos(caltech_dir)[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, path in enumerate(real):
        (folder / f"{i}.jpg").write_bytes(path.read_bytes())
    (folder / "copy-of-0.jpg").write_bytes(real[0].read_bytes())
    root = tmp_path / "store"
    config = EmbedJobConfig(input=[str(folder)], store=str(root), dedup=True, actors=1, regions=2)
    summary = run_job(config)
    assert (summary.embedded, summary.duplicates, summary.errors) == (3, 1, 0)  # images
    rows, _ = read_store(root)
    images = sorted(content_id(p.read_bytes()) for p in real)
    assert sorted(rows["id"]) == sorted(
        row for image in images for row in [image, *regions.region_ids(image, 2)]
    )
    parents = [regions.parent_of(i) for i in rows["id"]]
    assert all(s == shard_of(p, 4) for p, s in zip(parents, rows["shard"], strict=True))
    assert load_manifest(Store(root)).regions == 2
    (folder / "another-copy.jpg").write_bytes(real[1].read_bytes())
    again = run_job(EmbedJobConfig(input=[str(folder)], store=str(root), dedup=True))
    assert (again.embedded, again.skipped_present) == (0, 5)  # by content, not by name
    # another grid in the same store would mix vectors per image: refused
    with pytest.raises(ManifestMismatch, match="region"):
        run_job(EmbedJobConfig(input=[str(folder)], store=str(root), dedup=True, regions=3))
