"""Instance verification: do two photos show the same object? Local features and RANSAC.

A global embedding puts look-alikes (two red trainers of different makes, two Gothic facades)
as close as two photos of the very same thing. Image retrieval's classic second stage
(Philbin et al., "Object retrieval with large vocabularies and fast spatial matching", 2007)
checks the top candidates geometrically: match local features between the query and each
candidate, and count the matches that one plane-to-plane transform (a homography, fitted by
RANSAC) explains. Many such *inliers* mean the same object seen again (cropped, rotated, in
perspective, re-lit); look-alikes share few.

ORB features (binary, rotation-invariant, free to use, OpenCV's ``cv2.ORB``) on a grey copy of at
most ``MAX_SIDE`` pixels a side, matched by Hamming distance with Lowe's ratio test, then
``cv2.findHomography`` with RANSAC. ``verified_order`` moves the candidates with at least
``MIN_INLIERS`` inliers first (most inliers first) and keeps the others in their order.

Pure functions on decoded images: no Ray, no I/O. The ingress reads the candidates' images and
runs this off its event loop under a time budget (``serve.http.verification``);
``benchmarks/verify.py`` measures precision and cost on an instance set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

MAX_SIDE = 480  # pixels on the long side the features are found at
N_FEATURES = 500  # ORB keypoints per image at most (1000: 5x the matching time, measured)
RATIO = 0.8  # Lowe's ratio test: best match closer than this x the second best
RANSAC_PX = 6.0  # reprojection error (pixels at MAX_SIDE) an inlier may have
MIN_INLIERS = 30  # this many inliers or more: the same object (benchmarks/verify.py's rule)
SEED = 0  # RANSAC draws from OpenCV's global generator: seeded per call, reproducible

cv2.setNumThreads(1)  # callers run several verifications in threads of their own


@dataclass(frozen=True)
class LocalFeatures:
    """One image's ORB keypoints: positions (n, 2) float32 and descriptors (n, 32) uint8."""

    points: np.ndarray
    descriptors: np.ndarray | None

    def __len__(self) -> int:
        return len(self.points)


def grey(image: Image.Image, max_side: int = MAX_SIDE) -> np.ndarray:
    """A uint8 grey copy at most ``max_side`` pixels on its long side (never enlarged)."""
    image = image.convert("L")
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def local_features(image: Image.Image, n_features: int = N_FEATURES) -> LocalFeatures:
    """ORB keypoints and descriptors of ``image`` (at ``MAX_SIDE``)."""
    orb = cv2.ORB_create(nfeatures=n_features)
    keypoints, descriptors = orb.detectAndCompute(grey(image), None)
    points = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
    return LocalFeatures(points, descriptors)


def count_inliers(
    a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO, ransac_px: float = RANSAC_PX
) -> int:
    """Matches of ``a`` in ``b`` that one homography explains (0 when fewer than 4 match)."""
    if a.descriptors is None or b.descriptors is None or len(a) < 4 or len(b) < 4:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a.descriptors, b.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if len(good) < 4:  # a homography needs four correspondences
        return 0
    source = a.points[[m.queryIdx for m in good]]
    target = b.points[[m.trainIdx for m in good]]
    cv2.setRNGSeed(SEED)
    _, mask = cv2.findHomography(source, target, cv2.RANSAC, ransac_px)
    return 0 if mask is None else int(mask.sum())


def verified_order(inliers: Sequence[int | None], min_inliers: int = MIN_INLIERS) -> list[int]:
    """Positions of the candidates, verified ones (>= ``min_inliers``) first by inliers (ties:
    the earlier first), then the rest in their given order (``None``: not verified in time)."""
    verified = [i for i, n in enumerate(inliers) if n is not None and n >= min_inliers]
    verified.sort(key=lambda i: -inliers[i])  # stable: ties keep the search's order
    chosen = set(verified)
    return verified + [i for i in range(len(inliers)) if i not in chosen]
