"""Bytes -> checked, oriented RGB image -> centre crop, identical for catalogue and queries.

Every way an input can be bad raises ``ImageError`` with a short machine-readable ``reason``, so
batch jobs can count and record it and the HTTP API can answer a 4xx that names the problem.
Normalisation is not done here: crops stay uint8 (4x smaller than float32 when Ray ships them to
the embedding actors) and the model applies its own mean/std on its device.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000: larger than any photo, far below a PNG bomb
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error, not a grey half-image


class ImageError(ValueError):
    """An input that is not a usable image. ``reason`` is one of ``REASONS``."""

    REASONS = (
        "empty",
        "too_large",
        "not_an_image",
        "decompression_bomb",
        "truncated",
        "unsupported",
    )

    def __init__(self, reason: str, detail: str):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``data`` to RGB, upright per its EXIF orientation (first frame if animated).

    The pixel count is checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing.

    ``draft_size``: the short side the caller will resize to (``prepare``'s ``resize_size``).
    A JPEG is then decoded directly at the smallest 1/2, 1/4 or 1/8 DCT scale that keeps both
    sides >= ``draft_size`` (about half the decode time on a 2-core box; large photos far more).
    The image's size before that reduction, upright, is kept in ``img.info["source_size"]``.
    """
    if not data:
        raise ImageError("empty", "zero bytes")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes > limit {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombWarning as e:
        raise ImageError("decompression_bomb", str(e)) from None
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "no known image format recognised") from None
    except (OSError, SyntaxError, ValueError) as e:
        message = str(e) or type(e).__name__
        # a header cut short ("Truncated File Read") is a truncated image, not another format
        reason = "truncated" if "truncated" in message.lower() else "not_an_image"
        raise ImageError(reason, message) from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError("not_an_image", f"image has size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError("decompression_bomb", f"{width}x{height} pixels > limit {max_pixels}")
    try:
        img.seek(0)
        source_size = _upright_size(img)
        if draft_size and img.format == "JPEG":
            img.draft(None, (draft_size, draft_size))  # square box: rotation-independent
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img.info["source_size"] = source_size
        return img
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        message = str(e) or type(e).__name__
        reason = (
            "truncated"
            if "truncated" in message.lower() or isinstance(e, EOFError)
            else "not_an_image"
        )
        raise ImageError(reason, message) from None


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """Header size as the picture will stand after ``exif_transpose`` (5-8 swap the sides)."""
    width, height = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: exif_transpose will not rotate either
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: alpha is composited on white, 16-bit greys are scaled, CMYK converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def prepare(img: Image.Image, image_size: int, resize_size: int | None = None) -> np.ndarray:
    """Aspect-preserving resize of the short side to ``resize_size``, then a centre crop.

    Returns a (image_size, image_size, 3) uint8 array. ``resize_size`` defaults to the usual
    ImageNet ratio 256/224 of ``image_size``. Resize and crop are one resample of just the
    source box that lands in the crop (half the time of resizing the whole picture and
    cropping after; pixels differ by ~0.03/255 on average).
    """
    resize_size = resize_size or round(image_size * 256 / 224)
    width, height = img.size
    scale = resize_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
    # reducing_gap: a cheap box-reduce first for big sources, then an antialiased bilinear
    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)
