"""A store's learned vector transform: PCA reduction, optionally whitened (#25.5).

PCA-whitening (Jégou and Chum, "Negative evidence and co-occurrences in image retrieval", 2012;
the standard post-processing of CNN descriptors for instance retrieval) is learned on the
catalogue's own vectors: centre on their mean, project on the top ``dim`` principal directions,
scale each by ``eigenvalue ** power`` (``0``: PCA reduction only, ``-0.5``: full whitening),
and L2-normalise again in an inner-product store. ``benchmarks/whitening.py`` measured it on
Caltech-101: PCA to 128-d *raised* mAP@100 (0.703 -> 0.730 for EfficientNet-Lite0) while the
float16 rerank vectors shrink 10x (2,560 -> 256 bytes); whitening gained nothing over PCA alone.

**The contract it changes.** A store with a transform (the manifest's ``transform``: a file
``_transform/transform-<digest>.npz``, learned once by the first build,
``index.live.transform_fit``) indexes, reranks and scores every vector *in the transformed space*:
its versions hold the reduced vectors (float16, memory-mapped, as before) and the delta holds them
too. Parquet parts keep the model's full vectors (the source of truth, what the model tag guards),
so a store can be rebuilt into another space from them. Queries arrive in the model's space and a
shard transforms them (``index.live.delta.LiveShard``); a vector read back by id
(``LiveShard.vector_of``) is in the store's space and is searched as it is. A plain module: no Ray;
``to_bytes``/``from_bytes`` are what the store keeps.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from dataclasses import dataclass

import numpy as np

from index.storage.digest_files import read_by_digest, save_by_digest
from index.storage.manifest import Manifest
from index.storage.store import Store

TRANSFORM_DIR = "_transform"
# The written rule (``choose_transform``), from benchmarks/results/whitening.json (Caltech-101,
# exact search, mAP@100): PCA to this many dimensions gained >= 0.01 over the model's plain
# vectors (EfficientNet-Lite0 0.703 -> 0.730, MobileNetV2 0.606 -> 0.623); whitening gained
# nothing over PCA alone, so ``auto`` never whitens. A model not measured keeps its vectors.
MEASURED_PCA = {"efficientnet_lite0": 128, "mobilenet_v2": 128}
# ``auto`` learns a D-d covariance from at least 4 x D rows: the gains above were measured with
# PCA learned on 5,784 and 8,177 catalogue rows (4.5x and 6.4x 1280)
MIN_ROWS_PER_DIM = 4
MIN_ROWS_PER_OUT_DIM = 2  # an explicit ``pca:d`` needs at least 2 x d rows
AUTO, NONE = "auto", "none"
SPEC = re.compile(r"^(pca|whiten):(\d+)$")
WHITEN_POWER = -0.5  # ``whiten:D``: full whitening (``pca:D``: power 0)


class TransformError(ValueError):
    """A transform that cannot be learned, read or applied as asked."""


@dataclass(frozen=True)
class TransformSpec:
    """What to learn: reduce to ``dim`` dimensions, scaling each by ``eigenvalue ** power``."""

    dim: int
    power: float = 0.0

    @classmethod
    def parse(cls, text: str) -> TransformSpec:
        """``pca:D`` or ``whiten:D`` (``D`` >= 1)."""
        found = SPEC.match(text.strip().lower())
        if found is None or int(found.group(2)) < 1:
            raise TransformError(f"a transform is 'pca:D' or 'whiten:D' (D >= 1), got {text!r}")
        kind, dim = found.group(1), int(found.group(2))
        return cls(dim, WHITEN_POWER if kind == "whiten" else 0.0)

    def __str__(self) -> str:
        return f"{'pca' if self.power == 0 else 'whiten'}:{self.dim}"


@dataclass(frozen=True, eq=False)
class Transform:
    """``x -> normalise((x - mean) @ projection)``: (D,) mean, (D, d) projection."""

    mean: np.ndarray  # float32 (D,)
    projection: np.ndarray  # float32 (D, d)
    power: float
    normalize: bool  # L2-normalise the output (an inner-product store's vectors are unit)

    def __post_init__(self) -> None:
        if self.projection.ndim != 2 or self.mean.shape != (self.projection.shape[0],):
            raise TransformError("mean is (D,), projection (D, d)")
        if self.out_dim > self.in_dim:
            raise TransformError(f"a transform reduces: {self.in_dim}-d to {self.out_dim}-d")

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.projection.shape[1])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` (n, D) in the model's space -> (n, d) float32 in the store's."""
        x = np.asarray(vectors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise TransformError(f"expected (n, {self.in_dim}) vectors, got {x.shape}")
        out = (x - self.mean) @ self.projection
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(out, np.float32)

    @functools.cached_property
    def digest(self) -> str:
        """16 hex digits of BLAKE2b over the transform's bytes: its name in the store."""
        return hashlib.blake2b(self.to_bytes(), digest_size=8).hexdigest()

    def describe(self) -> str:
        return f"{TransformSpec(self.out_dim, self.power)} ({self.in_dim}-d -> {self.out_dim}-d)"

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            mean=np.ascontiguousarray(self.mean, np.float32),
            projection=np.ascontiguousarray(self.projection, np.float32),
            power=np.array(self.power, np.float64),
            normalize=np.array(self.normalize),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Transform:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                return cls(
                    np.ascontiguousarray(f["mean"], np.float32),
                    np.ascontiguousarray(f["projection"], np.float32),
                    float(f["power"]),
                    bool(f["normalize"]),
                )
        except (OSError, KeyError, ValueError) as e:
            raise TransformError(f"not a transform file: {e}") from None


def in_store_space(vectors, transform: Transform | None) -> np.ndarray:
    """``vectors`` in a store's space: through ``transform`` when they are in the model's space
    (its ``in_dim`` wide), as they are otherwise (none, or already reduced: ``vector_of``'s)."""
    x = np.asarray(vectors, np.float32)
    if transform is None or x.shape[-1] != transform.in_dim:
        return x
    return transform.apply(x.reshape(-1, transform.in_dim))


def learn_transform(vectors: np.ndarray, spec: TransformSpec, metric: str = "ip") -> Transform:
    """The transform ``spec`` asks for, learned on ``vectors`` (n, D): their mean and the top
    ``spec.dim`` principal directions scaled by ``eigenvalue ** spec.power``."""
    x = np.asarray(vectors, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise TransformError("learning a transform needs at least 2 vectors")
    if spec.dim > x.shape[1]:
        raise TransformError(f"cannot reduce {x.shape[1]}-d vectors to {spec.dim}-d")
    mean = x.mean(axis=0)
    values, directions = np.linalg.eigh(np.cov((x - mean).T))
    order = np.argsort(-values)[: spec.dim]
    top = max(float(values[order[0]]), 1e-12)
    values = np.maximum(values[order], 1e-6 * top)  # no blow-up of null directions
    projection = directions[:, order] * values**spec.power
    return Transform(
        np.ascontiguousarray(mean, np.float32),
        np.ascontiguousarray(projection, np.float32),
        spec.power,
        metric == "ip",
    )


def save_transform(store: Store, transform: Transform) -> str:
    """Write ``transform`` (``_transform/transform-<digest>.npz``, created once: the name is its
    content's digest) and return the path the manifest records."""
    return save_by_digest(store, TRANSFORM_DIR, "transform", transform)


@functools.lru_cache(maxsize=16)
def _read_transform(store: Store, path: str) -> Transform:
    return read_by_digest(store, path, "transform", Transform, TransformError)


def load_transform(store: Store, manifest: Manifest) -> Transform | None:
    """The store's transform (read once per store and file), None when it has none."""
    if manifest.transform is None:
        return None
    transform = _read_transform(store, manifest.transform)
    if transform.in_dim != manifest.dim:
        raise TransformError(
            f"transform {manifest.transform} takes {transform.in_dim}-d vectors, "
            f"the store's model makes {manifest.dim}-d"
        )
    return transform


def check_asked(asked: str) -> str:
    """``auto``, ``none`` or a ``TransformSpec`` text; anything else is a TransformError."""
    asked = asked.strip().lower()
    if asked not in (AUTO, NONE):
        TransformSpec.parse(asked)
    return asked


def choose_transform(
    asked: str, model: str, dim: int, rows: int, layout: str = "hash"
) -> tuple[TransformSpec | None, str]:
    """The transform a store's first build learns, and why (the written rule).

    ``asked``: ``none``; ``pca:D`` / ``whiten:D`` (learned when the build sees at least
    ``MIN_ROWS_PER_OUT_DIM * D`` rows, else refused); ``auto``: PCA to ``MEASURED_PCA[model]``
    dimensions when the model was measured to gain from it and the build sees at least
    ``MIN_ROWS_PER_DIM * dim`` rows, else none. A routed store routes rows and queries in the
    model's space (``index.ann.routing``), so it takes no transform yet."""
    asked = check_asked(asked)
    if asked == NONE:
        return None, "none asked"
    if layout != "hash":
        if asked != AUTO:
            raise TransformError(f"a {layout} store takes no transform (its router is {dim}-d)")
        return None, f"auto: a {layout} store routes in the model's {dim}-d space"
    if asked != AUTO:
        spec = TransformSpec.parse(asked)
        if spec.dim >= dim:
            raise TransformError(f"{asked} does not reduce the model's {dim}-d vectors")
        if rows < MIN_ROWS_PER_OUT_DIM * spec.dim:
            raise TransformError(
                f"{asked} needs at least {MIN_ROWS_PER_OUT_DIM * spec.dim:,} rows to learn, "
                f"the store has {rows:,}"
            )
        return spec, f"{asked} asked"
    name = model.split("@")[0]
    target = MEASURED_PCA.get(name)
    if target is None or target >= dim:
        return None, f"auto: {name} was not measured to gain from PCA (benchmarks/whitening.py)"
    if rows < MIN_ROWS_PER_DIM * dim:
        return None, (
            f"auto: {rows:,} rows are too few to learn a {dim}-d covariance "
            f"(PCA needs >= {MIN_ROWS_PER_DIM * dim:,})"
        )
    return TransformSpec(target), f"auto: PCA to {target}-d, measured on {name} (whitening.json)"
