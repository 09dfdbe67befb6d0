"""Inputs for the embedding job's tests: a fixed Caltech-101 subset, broken files, odd images.

The Caltech helpers read any tree of Caltech's layout (the shared photos or
``harness.photo_tree``'s): classes and picks come from the tree, never from class names.

Broken files are built byte by byte (no network, a few KB each) so each one exercises exactly
one failure: empty, truncated, not an image, and two decompression bombs (a header that claims
100,000 x 100,000 pixels, and a real 10,000 x 10,000 PNG that is 12 KB on disk).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = "101_ObjectCategories"


def classes(caltech_dir: Path) -> list[Path]:
    """The class folders, in name order (``BACKGROUND_Google`` is not a class)."""
    return sorted(
        p
        for p in (caltech_dir / CATEGORIES).iterdir()
        if p.is_dir() and p.name != "BACKGROUND_Google"
    )


def class_photos(caltech_dir: Path, index: int = 0) -> list[Path]:
    """The photos of the ``index``-th class, in name order."""
    return sorted(classes(caltech_dir)[index].glob("*.jpg"))


def grey_photos(caltech_dir: Path, n: int) -> list[Path]:
    """The first ``n`` greyscale photos of the classes, in name order."""
    found = []
    for cls in classes(caltech_dir):
        for path in sorted(cls.glob("*.jpg")):
            with Image.open(path) as img:
                if img.mode == "L":
                    found.append(path)
            if len(found) == n:
                return found
    return found


def caltech_subset(caltech_dir: Path, n: int, per_class: int = 3) -> list[Path]:
    """``n`` photos, ``per_class`` from each class in name order (BACKGROUND_Google excluded)."""
    folders = classes(caltech_dir)
    picked: list[Path] = []
    for offset in range(0, 1000, per_class):
        for cls in folders:
            files = sorted(cls.glob("*.jpg"))[offset : offset + per_class]
            picked.extend(files)
            if len(picked) >= n:
                return picked[:n]
    return picked


def link_images(files: list[Path], folder: Path) -> list[Path]:
    """Symlink photos into one folder under unique names (a folder input for the CLI)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = folder / f"{f.parent.name}__{f.name}"
        target.symlink_to(f.resolve())
        out.append(target)
    return out


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(width: int, height: int, bit_depth: int, colour: int, raw: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw, 9))
        + _png_chunk(b"IEND", b"")
    )


def huge_header_png() -> bytes:
    """A PNG whose header claims 100,000 x 100,000 RGB pixels, with one row of data."""
    return png_bytes(100_000, 100_000, 8, 2, b"\x00" * 301)


def bomb_png(side: int = 10_000) -> bytes:
    """A complete, valid 1-bit PNG of ``side`` x ``side`` black pixels: ~12 KB for 100 MP."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(seed: int = 0, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A smooth colourful test picture (gradients + a disc), deterministic per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < (0.2 * min(w, h)) ** 2).astype(np.float32)
    rgb = np.stack([x / w * 255, y / h * 255, disc * 255], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def bad_files(real_jpeg: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected reason prefix in the errors Parquet)."""
    return {
        "zero.jpg": (b"", "empty"),
        "truncated.jpg": (real_jpeg[: len(real_jpeg) // 2], "truncated"),
        "text.jpg": (b"this is a text file, not a picture\n" * 20, "not_an_image"),
        "header_bomb.png": (huge_header_png(), "decompression_bomb"),
        "bomb.png": (bomb_png(), "decompression_bomb"),
    }


def odd_valid_files() -> dict[str, bytes]:
    """Valid images in unusual modes: each must embed like any photo."""
    base = photo(1)
    grey16 = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)  # mode I;16
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    return {
        "grey.jpg": _save(base.convert("L"), "JPEG"),
        "cmyk.jpg": _save(base.convert("CMYK"), "JPEG"),
        "grey16.png": _save(grey16, "PNG"),
        "alpha.png": _save(rgba, "PNG"),
        "palette.gif": _save(base.convert("P"), "GIF"),
        "rotated.jpg": _save(photo(2, (400, 200)), "JPEG", exif=exif),
        "tiny.png": _save(photo(3, (1, 1)), "PNG"),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out.append(folder / name)
    return out
