"""``verify``: an image search's results re-ordered by geometric verification (instance search).

With ``verify: true`` on an image query, each of the answer's results is checked against the
query image by local features and RANSAC (``embedding.verify``): results showing the same object
(at least ``MIN_INLIERS`` inliers) move first, most inliers first; the others keep their order.
Each result says its ``inliers``; the answer's ``verification`` says how many were checked,
verified, unreadable or out of time. Ask a larger ``k`` to verify more candidates.

The catalogue images are read as thumbnails are (``serve.http.thumbnails.Sources``: only uris
under ``thumbnail_roots``; a uri outside them is *unreadable* and keeps its place), and decoded
with the caller's limits. The work (reads, decodes, features, matching) runs in this module's own
threads, never on the event loop, and the answer waits for it at most ``verify_budget_ms``
(``ServeConfig``): a result not verified by then keeps its place (``inliers: null``), its thread
finishes in the background. A catalogue image's features are kept in a per-replica LRU of
``CACHE_BYTES`` (about 20 KB an image) keyed by ``(id, uri)``, as thumbnails are. Other query
kinds (vector, id, text) have no image to verify with: their answers say
``verification.skipped``.
"""

from __future__ import annotations

import asyncio
import time

from embedding.preprocess import ImageError, decode_image
from embedding.verify import (
    MIN_INLIERS,
    LocalFeatures,
    count_inliers,
    local_features,
    verified_order,
)
from serve.http.errors import ApiError
from serve.http.limits import Limits
from serve.http.thumbnails import ByteLru, Sources, named_pool

VERIFY_THREADS = 2  # OpenCV releases the GIL: these run beside the event loop
CACHE_BYTES = 32 * 1024 * 1024  # ~20 KB an image at 500 ORB features: ~1,600 images


def feature_cache(max_bytes: int = CACHE_BYTES) -> ByteLru[LocalFeatures]:
    """Catalogue images' features by ``(id, uri)``, as thumbnails are cached."""
    return ByteLru(max_bytes, lambda f: f.points.nbytes + getattr(f.descriptors, "nbytes", 0))


_cache = feature_cache()


def _features(data: bytes, limits: Limits):
    image = decode_image(data, max_pixels=limits.max_pixels, max_bytes=limits.max_upload_bytes)
    return local_features(image)


def _inliers(query, row: dict, sources: Sources, limits: Limits) -> int | None:
    """Inliers between the query's features and the result ``row``'s catalogue image; None when
    the image may not or cannot be read or decoded."""
    key = (row["id"], row["uri"])
    features = _cache.get(key)
    if features is None:
        try:
            features = _features(sources.read(row["uri"], limits.max_upload_bytes), limits)
        except (ApiError, ImageError):
            return None
        _cache.put(key, features)
    return count_inliers(query, features)


async def verify_results(
    image: bytes | None, results: list[dict], sources: Sources, limits: Limits, budget_s: float
) -> tuple[list[dict], dict]:
    """``results`` re-ordered (each with ``inliers``), and the answer's ``verification``."""
    started = time.perf_counter()
    if image is None:
        return results, {"skipped": "verify needs an image query", "candidates": len(results)}
    loop = asyncio.get_running_loop()
    pool = named_pool("verify", VERIFY_THREADS)
    deadline = started + budget_s
    try:
        query = await asyncio.wait_for(
            loop.run_in_executor(pool, _features, image, limits), budget_s
        )
    except (TimeoutError, ImageError):  # the query was embedded already: it decodes
        query = None
    counts: list[int | None] = [None] * len(results)
    unreadable = timed_out = 0
    if query is not None and results:
        futures = [
            loop.run_in_executor(pool, _inliers, query, row, sources, limits) for row in results
        ]
        done, _ = await asyncio.wait(futures, timeout=max(0.0, deadline - time.perf_counter()))
        for i, future in enumerate(futures):
            if future in done:
                counts[i] = future.result()
                unreadable += counts[i] is None
            else:
                timed_out += 1
                future.cancel()
    else:
        timed_out = len(results)
    order = verified_order(counts, MIN_INLIERS)
    shown = [{**results[i], "inliers": counts[i]} for i in order]
    summary = {
        "candidates": len(results),
        "checked": len(results) - unreadable - timed_out,
        "verified": sum(n is not None and n >= MIN_INLIERS for n in counts),
        "unreadable": unreadable,
        "timed_out": timed_out,
        "min_inliers": MIN_INLIERS,
        "ms": round((time.perf_counter() - started) * 1000, 3),
    }
    return shown, summary
