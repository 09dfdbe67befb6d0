"""Geometric verification in-process (``embedding.verify``, ``serve.http.verification``): the same
object seen again (cropped, rotated, in perspective) shares many RANSAC inliers with its source,
another photo few; the order, the summary and the feature cache. The served path is tested in
``test_search_page`` (``verify`` on an image query)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from embedding.verify import MIN_INLIERS, count_inliers, local_features, verified_order
from serve.config import ServeConfig
from serve.http import verification
from serve.http.limits import limits_for
from serve.http.thumbnails import Sources
from visual_search.demo_images import load_photo


def _warped(image: Image.Image) -> Image.Image:
    """A 70 % crop, turned 15 degrees, then seen in perspective (a quad mapped to the frame)."""
    w, h = image.size
    crop = image.crop((w * 15 // 100, h * 15 // 100, w * 85 // 100, h * 85 // 100))
    crop = crop.rotate(15, expand=True, resample=Image.Resampling.BILINEAR)
    w, h = crop.size
    quad = (0, 0, w * 0.1, h, w, h * 0.95, w * 0.9, h * 0.05)  # corners: NW, SW, SE, NE
    return crop.transform(crop.size, Image.Transform.QUAD, quad, Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: load_photo(f"{name}.png") for name in ("astronaut", "coffee", "chelsea")}


def test_the_same_object_shares_many_inliers_and_other_photos_few(photos):
    query = local_features(_warped(photos["astronaut"]))
    same = count_inliers(query, local_features(photos["astronaut"]))
    others = [count_inliers(query, local_features(photos[n])) for n in ("coffee", "chelsea")]
    assert same >= 3 * MIN_INLIERS, same
    assert max(others) < MIN_INLIERS, others
    blank = local_features(Image.new("RGB", (64, 64), "grey"))  # no keypoints at all
    assert len(blank) == 0 and count_inliers(query, blank) == 0


def test_verified_first_by_inliers_the_rest_in_order():
    assert verified_order([3, 40, None, 90, 40, 0], min_inliers=15) == [3, 1, 4, 0, 2, 5]
    assert verified_order([], min_inliers=15) == []
    assert verified_order([None, 1, 2], min_inliers=15) == [0, 1, 2]


def test_results_re_ordered_with_a_summary_and_unreadable_rows_kept(photos, tmp_path):
    rows = []
    for i, name in enumerate(("coffee", "astronaut", "chelsea")):
        path = tmp_path / f"{name}.jpg"
        photos[name].save(path, "JPEG", quality=90)
        rows.append({"id": f"r{i}", "uri": path.as_uri(), "score": 1.0 - i / 10})
    rows.append({"id": "elsewhere", "uri": "file:///etc/hostname", "score": 0.5})
    query = io.BytesIO()
    _warped(photos["astronaut"]).save(query, "JPEG", quality=90)
    limits = limits_for(ServeConfig(store="/tmp/x"), keyed=False)
    sources = Sources([str(tmp_path)])
    shown, summary = asyncio.run(
        verification.verify_results(query.getvalue(), rows, sources, limits, budget_s=30)
    )
    assert [r["id"] for r in shown] == ["r1", "r0", "r2", "elsewhere"]
    assert shown[0]["inliers"] >= MIN_INLIERS and shown[-1]["inliers"] is None
    assert summary["candidates"] == 4 and summary["checked"] == 3 and summary["verified"] == 1
    assert summary["unreadable"] == 1 and summary["timed_out"] == 0
    # a budget too short for any check: the search's order, nothing verified
    verification._cache = verification.feature_cache()
    shown, summary = asyncio.run(
        verification.verify_results(query.getvalue(), rows, sources, limits, budget_s=0)
    )
    assert [r["id"] for r in shown] == ["r0", "r1", "r2", "elsewhere"]
    assert summary["timed_out"] == 4 and summary["verified"] == 0
    shown, summary = asyncio.run(verification.verify_results(None, rows, sources, limits, 1))
    assert shown == rows and summary["skipped"]


def test_the_feature_cache_drops_the_least_recently_used():
    features = local_features(Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
    blob = local_features(load_photo("astronaut.png"))
    cache = verification.feature_cache(max_bytes=2 * blob.points.nbytes + 2 * 32 * len(blob))
    cache.put(("a", "u"), blob)
    cache.put(("b", "u"), blob)
    assert cache.get(("a", "u")) is blob  # a is now the most recent
    cache.put(("c", "u"), blob)
    assert cache.get(("b", "u")) is None and cache.get(("a", "u")) is blob
    cache.put(("d", "u"), features)  # no keypoints: costs nothing
    assert len(cache) == 3
