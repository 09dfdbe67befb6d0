"""A Caltech-101-shaped photo tree made from the photos scikit-image ships, for the tests.

The layout is the shared data folder's ``images/caltech101``: ``101_ObjectCategories/<class>/
image_NNNN.jpg``, ``train.txt`` and ``test.txt`` listing ``<class>/image_NNNN.jpg``, and a
``BACKGROUND_Google`` folder that is not a class, so every helper and test that reads Caltech
reads this unchanged. A class is one subject: the real photograph(s) of it inside scikit-image's
wheel (the motorcycle's stereo pair is two photos of one class) and seeded edits of them (crops,
mirror images, small rotations, colour casts and brightness changes, rescaling to Caltech's
~200-300 px), or, for ``faces``, 24 different people from scikit-image's LFW subset, so one
class is a class of distinct pictures and not of edits. Grey sources stay grey, as Caltech's
grey photos do. Nothing is downloaded (no ``pooch``): only files inside the wheel are read.

Deterministic: the same tree (bytes included, for one Pillow) on every machine and run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from visual_search.demo_images import load_photo, skimage_data_dir

CATEGORIES = "101_ObjectCategories"
BACKGROUND = "BACKGROUND_Google"
PER_CLASS = 24  # images per class
TRAIN_PER_CLASS = 16  # the rest are test.txt's (Caltech's split is about 2:1 too)
BACKGROUND_IMAGES = 8
FACES = "faces"

# class -> files under skimage/data; grey sources are saved grey
PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut.png",),
    "brick": ("brick.png",),
    "cameraman": ("camera.png",),
    "cells": ("cell.png",),
    "chelsea_cat": ("chelsea.png",),
    "clock": ("clock_motion.png",),
    "coffee": ("coffee.png",),
    "coins": ("coins.png",),
    "grass": ("grass.png",),
    "gravel": ("gravel.png",),
    "horse": ("horse.png",),
    "hubble": ("hubble_deep_field.jpg",),
    "ihc_tissue": ("ihc.png",),
    "logo": ("logo.png",),
    "moon": ("moon.png",),
    "motorcycle": ("motorcycle_left.png", "motorcycle_right.png"),
    "page": ("page.png",),
    "retina": ("retina.jpg",),
    "rocket": ("rocket.jpg",),
    "text": ("text.png",),
}
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def class_names() -> list[str]:
    """Every class of the tree, sorted (``BACKGROUND_Google`` is not one)."""
    return sorted([*PHOTOS, FACES])


def _rng(*keys: object) -> np.random.Generator:
    text = "/".join(str(k) for k in keys)
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(text.encode()).digest()[:8]))


def _source(name: str) -> Image.Image:
    """One photo from the wheel, at most 800 px a side; grey ones stay grey (mode L)."""
    with Image.open(skimage_data_dir() / name) as raw:
        grey = raw.mode in GREY_MODES
    img = load_photo(name)
    return img.convert("L") if grey else img


def _resize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Caltech's sizes: the long side 200-300 px."""
    side = int(rng.integers(200, 301))
    scale = side / max(img.size)
    size = (max(16, round(img.width * scale)), max(16, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def edit(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of 55-95 % of each side, then maybe a mirror image, a rotation of up to 15
    degrees, brightness/contrast changes and (for colour photos) a colour cast."""
    w, h = img.size
    cw, ch = (int(s * f) for s, f in zip(img.size, rng.uniform(0.55, 0.95, 2), strict=True))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if rng.random() < 0.4:
        img = img.rotate(float(rng.uniform(-15, 15)), Image.Resampling.BICUBIC, expand=False)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
    if img.mode == "RGB":
        gains = rng.uniform(0.8, 1.2, 3)
        img = Image.fromarray((np.asarray(img, np.float32) * gains).clip(0, 255).astype(np.uint8))
    return img


def _lfw() -> np.ndarray:
    """scikit-image's LFW subset: 100 faces then 100 other patches, 25 x 25 grey in [0, 1]."""
    return np.load(skimage_data_dir() / "lfw_subset.npy")


def _patch(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray((pixels * 255).clip(0, 255).astype(np.uint8), "L")
    side = int(rng.integers(120, 201))
    return img.resize((side, side), Image.Resampling.BICUBIC)


def class_images(cls: str) -> list[Image.Image]:
    """The ``PER_CLASS`` images of one class, in file order (the first is the photo itself)."""
    if cls == FACES:
        return [_patch(face, _rng(cls, i)) for i, face in enumerate(_lfw()[:PER_CLASS])]
    sources = [_source(name) for name in PHOTOS[cls]]
    out = []
    for i in range(PER_CLASS):
        rng = _rng(cls, i)
        photo = sources[i % len(sources)]
        out.append(_resize(photo if i < len(sources) else edit(photo, rng), rng))
    return out


def write_photo_tree(root: Path) -> Path:
    """Write the tree under ``root`` (a new or empty folder) and return ``root``."""
    categories = root / CATEGORIES
    train, test = [], []
    groups = {cls: class_images(cls) for cls in class_names()}
    groups[BACKGROUND] = [
        _patch(p, _rng(BACKGROUND, i)) for i, p in enumerate(_lfw()[100 : 100 + BACKGROUND_IMAGES])
    ]
    for cls, images in groups.items():
        (categories / cls).mkdir(parents=True, exist_ok=True)
        order = _rng(cls, "split").permutation(len(images))
        cut = len(images) * TRAIN_PER_CLASS // PER_CLASS
        for rank, i in enumerate(order):
            name = f"{cls}/image_{i + 1:04d}.jpg"
            images[i].save(categories / name, format="JPEG", quality=90)
            (train if rank < cut else test).append(name)
    (root / "train.txt").write_text("".join(f"{n}\n" for n in sorted(train)))
    (root / "test.txt").write_text("".join(f"{n}\n" for n in sorted(test)))
    return root
