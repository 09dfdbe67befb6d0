"""The demo's default image set: real photos shipped inside scikit-image, plus edited copies.

scikit-image's wheel carries a handful of real photographs (a cat, a cup of coffee, an astronaut,
a rocket, a motorcycle, the Hubble deep field, textures, microscopy...). Each becomes a *group*:
the photo itself and deterministic edits of it (crops, a mirror image, colour and brightness
changes, a small rotation, a recompressed thumbnail), so every query has true matches to find.
One more edit per group, not in the catalogue, is written to a separate ``queries`` folder:
searching with it shows retrieval of unseen pictures, not just lookup of stored ones.

File names are ``<group>__<edit>.jpg``; the group is the relevance label.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# group -> file names under skimage/data (the stereo motorcycle pair is one scene: one group)
PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut.png",),
    "chelsea_cat": ("chelsea.png",),
    "coffee": ("coffee.png",),
    "rocket": ("rocket.jpg",),
    "motorcycle": ("motorcycle_left.png", "motorcycle_right.png"),
    "hubble": ("hubble_deep_field.jpg",),
    "retina": ("retina.jpg",),
    "ihc_tissue": ("ihc.png",),
    "cameraman": ("camera.png",),
    "coins": ("coins.png",),
    "moon": ("moon.png",),
    "brick": ("brick.png",),
    "grass": ("grass.png",),
    "gravel": ("gravel.png",),
    "cells": ("cell.png",),
    "page": ("page.png",),
}


def skimage_data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).resolve().parent


def _rng(*keys: str) -> np.random.Generator:
    seed = int.from_bytes(hashlib.blake2b("/".join(keys).encode(), digest_size=8).digest(), "big")
    return np.random.default_rng(seed)


def _crop(img: Image.Image, rng: np.random.Generator, low: float, high: float) -> Image.Image:
    """A random crop keeping ``low..high`` of each side, anywhere in the picture."""
    w, h = img.size
    fw, fh = rng.uniform(low, high, 2)
    cw, ch = max(32, int(w * fw)), max(32, int(h * fh))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    return img.crop((left, top, left + cw, top + ch))


def _jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5))


def _tint(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A colour cast: per-channel gains, as from a different white balance."""
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.75, 1.25, 3)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _thumbnail(img: Image.Image, _rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    return img.resize((max(48, w // 3), max(48, h // 3)), Image.Resampling.BILINEAR)


EDITS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "original": lambda img, rng: img,
    "mirror": lambda img, rng: ImageOps.mirror(img),
    "crop_a": lambda img, rng: _crop(img, rng, 0.6, 0.85),
    "crop_b": lambda img, rng: _crop(img, rng, 0.6, 0.85),
    "crop_mirror": lambda img, rng: ImageOps.mirror(_crop(img, rng, 0.7, 0.9)),
    "jitter": _jitter,
    "tint": _tint,
    "rotate": lambda img, rng: img.rotate(float(rng.uniform(-12, 12)), resample=Image.BICUBIC),
    "thumbnail": _thumbnail,
}
QUERY_EDIT = "query"  # crop + jitter + mirror: a picture not in the catalogue


def _query_edit(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return _jitter(ImageOps.mirror(_crop(img, rng, 0.65, 0.9)), rng)


MAX_SIDE = 800  # the big microscopy/astronomy photos are shrunk: faster to decode and embed


def load_photo(name: str) -> Image.Image:
    img = Image.open(skimage_data_dir() / name)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def write_demo_images(images_dir: Path, queries_dir: Path | None = None) -> dict[str, list[Path]]:
    """Write the catalogue (and held-out queries); return ``group -> catalogue files``.

    Deterministic: the same bytes on every machine and run (seeded per group and edit), so
    re-running the demo re-embeds nothing.
    """
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    if queries_dir is not None:
        Path(queries_dir).mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Path]] = {}
    for group, files in PHOTOS.items():
        for index, file in enumerate(files):
            photo = load_photo(file)
            suffix = f"_{index}" if len(files) > 1 else ""
            for edit, fn in EDITS.items():
                path = images_dir / f"{group}__{edit}{suffix}.jpg"
                _save(fn(photo, _rng(group, file, edit)), path)
                groups.setdefault(group, []).append(path)
            if queries_dir is not None and index == 0:
                path = Path(queries_dir) / f"{group}__{QUERY_EDIT}.jpg"
                _save(_query_edit(photo, _rng(group, file, QUERY_EDIT)), path)
    return groups


def group_of(uri: str) -> str:
    """The relevance label of a demo image from its file name."""
    return Path(uri.rstrip("/")).name.split("__", 1)[0]


def _save(img: Image.Image, path: Path) -> None:
    if path.exists():
        return  # deterministic content: an existing file is already right
    tmp = path.with_suffix(".tmp")
    img.convert("RGB").save(tmp, format="JPEG", quality=90)
    tmp.replace(path)
