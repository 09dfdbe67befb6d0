"""Generated ANN files with exact ground truth, in the shared data folder's layout and names.

``write_ann_files(folder)`` writes the two files the tests read from ``../shared/data/ann``, in
the ann-benchmarks HDF5 layout (``train``, ``test``, ``neighbors`` = exact top-100 int32 ids
into ``train``, ``distances``, attribute ``distance``), with the same shapes:

- ``caltech101-mnv2-1280-angular.hdf5``: 8,177 x 1280 train, with ``train_labels``,
  ``test_labels``, ``train_paths`` and ``test_paths``. Stands in for CNN embeddings: each row is
  ``relu(W @ (centre_c + s * z))``, a point of a 48-d latent space around its class centre (101
  classes) pushed through a fixed random 1280 x 48 projection and a ReLU, as pooled CNN features
  are non-negative, low in intrinsic dimension and clustered by class with overlaps; unit
  norm. IVF+PQ on it behaves as on the real file: high recall after the exact rerank, clearly
  lower from the PQ codes alone or from one IVF list.
- ``sift5k-128-euclidean.hdf5``: 5,000 x 128 train, 103 test, non-negative integer-valued
  vectors like SIFT descriptors (the same construction in 128-d, scaled to 0..~150, rounded).

The ground truth is exact (float32 brute force with FAISS, the same as ``harness.synthetic``);
a fixed seed makes every machine generate the same files.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

CALTECH_ANN = "caltech101-mnv2-1280-angular.hdf5"
SIFT_ANN = "sift5k-128-euclidean.hdf5"
TOP = 100  # ground-truth neighbours per query, as in ann-benchmarks


def latent_mixture(
    n: int, dim: int, classes: int, latent: int, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` non-negative vectors of ``classes`` overlapping classes of a ``latent``-d space seen
    through a random ``dim`` x ``latent`` projection and a ReLU; and each row's class."""
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((dim, latent)).astype(np.float32) / np.sqrt(latent)
    centres = rng.standard_normal((classes, latent)).astype(np.float32)
    label = rng.integers(0, classes, n).astype(np.int32)
    spreads = spread * rng.uniform(0.6, 1.4, classes).astype(np.float32)
    z = centres[label] + spreads[label, None] * rng.standard_normal((n, latent), np.float32)
    return np.maximum(z @ projection.T + 0.2, 0.0).astype(np.float32), label


def exact_neighbours(
    train: np.ndarray, test: np.ndarray, metric: str, k: int = TOP
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` ids (int32) and distances: cosine distance for "angular", L2 for
    "euclidean" (ann-benchmarks' conventions)."""
    import faiss

    if metric == "angular":
        index = faiss.IndexFlatIP(train.shape[1])
        index.add(train)
        sims, ids = index.search(test, k)
        return ids.astype(np.int32), (1.0 - sims).astype(np.float32)
    index = faiss.IndexFlatL2(train.shape[1])
    index.add(train)
    squared, ids = index.search(test, k)
    return ids.astype(np.int32), np.sqrt(np.maximum(squared, 0)).astype(np.float32)


def _write(path: Path, metric: str, train: np.ndarray, test: np.ndarray, **extra) -> None:
    neighbours, distances = exact_neighbours(train, test, metric)
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = metric
        f.create_dataset("train", data=train)
        f.create_dataset("test", data=test)
        f.create_dataset("neighbors", data=neighbours)
        f.create_dataset("distances", data=distances)
        for name, values in extra.items():
            f.create_dataset(name, data=values)


def caltech_like(seed: int = 101) -> dict[str, np.ndarray]:
    """The stand-in for ``caltech101-mnv2-1280-angular``'s arrays (unit rows)."""
    vectors, label = latent_mixture(8677, 1280, classes=101, latent=48, spread=0.65, seed=seed)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = np.array(
        [f"class_{c:03d}/image_{i + 1:04d}.jpg" for i, c in enumerate(label)], dtype=object
    )
    return {
        "train": vectors[:8177],
        "test": vectors[8177:],
        "train_labels": label[:8177],
        "test_labels": label[8177:],
        "train_paths": paths[:8177],
        "test_paths": paths[8177:],
    }


def sift_like(seed: int = 128) -> dict[str, np.ndarray]:
    """The stand-in for ``sift5k-128-euclidean``'s arrays: integers 0..~150, as SIFT's."""
    vectors, _ = latent_mixture(5000 + 103, 128, classes=64, latent=24, spread=0.9, seed=seed)
    vectors = np.round(vectors * (60.0 / vectors.mean())).clip(0, 255).astype(np.float32)
    return {"train": vectors[:5000], "test": vectors[5000:]}


def write_ann_files(folder: Path) -> Path:
    """Write both files into ``folder`` (created) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    caltech = caltech_like()
    string = h5py.string_dtype()
    _write(
        folder / CALTECH_ANN,
        "angular",
        caltech["train"],
        caltech["test"],
        train_labels=caltech["train_labels"],
        test_labels=caltech["test_labels"],
        train_paths=caltech["train_paths"].astype(string),
        test_paths=caltech["test_paths"].astype(string),
    )
    sift = sift_like()
    _write(folder / SIFT_ANN, "euclidean", sift["train"], sift["test"])
    return folder
