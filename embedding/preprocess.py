"""Bytes -> checked, oriented RGB image -> centre crop, identical for catalogue and queries.

Every way an input can be bad raises ``ImageError`` with a short machine-readable ``reason``, so
batch jobs can count and record it and the HTTP API can answer a 4xx that names the problem.
Normalisation is not done here: crops stay uint8 (4x smaller than float32 when Ray ships them to
the embedding actors) and the model applies its own mean/std on its device.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo straight to numpy: the batch job's and the query path's JPEG decoder
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; PIL decodes every JPEG without it
    simplejpeg = None

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

    Plain JPEGs (YCbCr or greyscale, no EXIF block) are decoded by ``simplejpeg`` (libjpeg-turbo
    into a numpy array, at the same DCT scale PIL's draft picks): the same pixels as PIL's
    decoder, bit for bit (``tests/test_embed_units.py``), without PIL's file-object parsing.
    Anything else, and any JPEG simplejpeg refuses, takes the PIL path, which names the problem.
    """
    if not data:
        raise ImageError("empty", "zero bytes")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes > limit {max_bytes}")
    fast = _fast_jpeg(data, max_pixels, draft_size)
    if fast is not None:
        return fast
    return _decode_pil(data, max_pixels, draft_size)


_FAST_COLORSPACES = ("YCbCr", "Gray")


def _fast_jpeg(data: bytes, max_pixels: int, draft_size: int | None) -> Image.Image | None:
    """A plain JPEG decoded by simplejpeg at PIL's draft scale, or None for the PIL path."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff" or _needs_pil(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in _FAST_COLORSPACES or width < 1 or height < 1:
        return None
    if width * height > max_pixels:
        raise ImageError("decompression_bomb", f"{width}x{height} pixels > limit {max_pixels}")
    scale = 1
    if draft_size:  # PIL's JpegImageFile.draft: the largest of 8, 4, 2 that keeps both sides
        fit = min(width // draft_size, height // draft_size)
        scale = next((s for s in (8, 4, 2) if fit >= s), 1)
    want = (-(-height // scale), -(-width // scale))
    try:
        pixels = simplejpeg.decode_jpeg(
            data, "RGB", min_height=want[0], min_width=want[1], min_factor=scale, strict=True
        )
    except ValueError:  # truncated, corrupt: PIL decides what to call it
        return None
    if pixels.shape[:2] != want:  # a scale PIL would not have used: stay identical, use PIL
        return None
    img = Image.fromarray(pixels)
    img.info["source_size"] = (width, height)
    return img


def _needs_pil(data: bytes) -> bool:
    """Whether the JPEG's header segments hold an EXIF block (which may rotate the picture) or
    an MPF index (a multi-picture file, which PIL decodes without the draft scale)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA or not (0xE0 <= marker <= 0xEF or marker in (0xFE, 0xDB, 0xC4)):
            return False  # past the application segments (or a frame header): no EXIF
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return True
        if marker == 0xE2 and data[pos + 4 : pos + 8] == b"MPF\x00":
            return True
        pos += 2 + length
    return False


def _decode_pil(data: bytes, max_pixels: int, draft_size: int | None) -> Image.Image:
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


def resize_size_of(image_size: int) -> int:
    """The short side an image is resized to before its centre crop: the usual ImageNet ratio
    256/224 of ``image_size``. The batch job, the query path and the benchmarks all use this,
    so a catalogue image sent as a query gets the catalogue's own crop (and draft decode)."""
    return round(image_size * 256 / 224)


CROP_MODES = ("center", "squash", "border")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class CropSpec:
    """How an image becomes the model's square input: what the model's library says.

    ``mode``: ``center`` (resize the short side to ``resize``, crop the centre: torchvision,
    timm's default, CLIP), ``squash`` (resize the whole picture to ``resize`` x ``resize``, then
    crop the centre: SigLIP, timm's ``squash``), ``border`` (fit the long side to ``resize``,
    pad with ``fill``, crop or pad to ``size``: timm's ``border``, open_clip's ``longest``).
    ``resize`` None: the ImageNet ratio 256/224 of ``size`` (the torchvision backbones' crop).
    ``long_side``: how ``center`` sizes the long side, ``round`` (this project's torchvision
    crop, kept so existing stores' vectors do not move) or ``floor`` (torchvision's ``Resize``,
    which timm's and open_clip's transforms use: ``int(resize * long / short)``).
    A plain dict of it travels to the batch job's decode tasks and the HTTP ingress (no torch).
    """

    size: int = 224
    resize: int | None = None
    mode: str = "center"
    interpolation: str = "bilinear"
    fill: tuple[int, int, int] = (0, 0, 0)
    long_side: str = "round"

    def __post_init__(self) -> None:
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop mode {self.mode!r}: expected one of {CROP_MODES}")
        if self.long_side not in ("round", "floor"):
            raise ValueError(f"long_side {self.long_side!r}: expected 'round' or 'floor'")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r}: expected {tuple(_RESAMPLE)}")
        if self.size < 1 or (self.resize is not None and self.resize < 1):
            raise ValueError(f"crop size {self.size} / resize {self.resize} must be >= 1")
        object.__setattr__(self, "fill", tuple(int(v) for v in self.fill))

    @property
    def resize_size(self) -> int:
        return self.resize or resize_size_of(self.size)

    @property
    def draft_size(self) -> int:
        """The short side a JPEG may be draft-decoded down to without losing pixels the crop
        uses (``border`` fits the long side, so a smaller draft would do; kept simple)."""
        return self.resize_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, value: CropSpec | dict | int) -> CropSpec:
        """A CropSpec from itself, its dict, or a bare size (the torchvision crop)."""
        if isinstance(value, CropSpec):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls(size=int(value))


def check_box(box) -> tuple[float, float, float, float]:
    """``box`` as ``(x0, y0, x1, y1)`` fractions of an image's width and height, checked."""
    values = tuple(float(v) for v in box)
    if len(values) != 4 or not (
        0.0 <= values[0] < values[2] <= 1.0 and 0.0 <= values[1] < values[3] <= 1.0
    ):
        raise ValueError(f"box: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {tuple(box)}")
    return values


def crop_box(img: Image.Image, box) -> Image.Image:
    """The part of ``img`` inside ``box`` (``check_box``): what the embedding job embeds for a
    region cell (``index.rows.regions``) and what a client sends for a box drawn on a query."""
    x0, y0, x1, y1 = check_box(box)
    if (x0, y0, x1, y1) == (0.0, 0.0, 1.0, 1.0):
        return img
    w, h = img.size
    return img.crop((round(x0 * w), round(y0 * h), max(1, round(x1 * w)), max(1, round(y1 * h))))


def prepare(
    img: Image.Image, image_size: int | CropSpec, resize_size: int | None = None
) -> np.ndarray:
    """The model's (size, size, 3) uint8 input from a decoded image, by its ``CropSpec``
    (a bare ``image_size`` with ``resize_size``: the torchvision centre crop).

    ``center``: resize and crop are one resample of just the source box that lands in the crop
    (half the time of resizing the whole picture and cropping after; pixels differ by
    ~0.03/255 on average).
    """
    spec = image_size if isinstance(image_size, CropSpec) else CropSpec(image_size, resize_size)
    size, resample = spec.size, _RESAMPLE[spec.interpolation]
    width, height = img.size
    if spec.mode == "center":
        short = spec.resize_size
        fit = round if spec.long_side == "round" else int
        new_w = short if width <= height else fit(short * width / height)
        new_h = short if height <= width else fit(short * height / width)
        new_w, new_h = max(size, new_w), max(size, new_h)
    elif spec.mode == "squash":
        new_w = new_h = max(size, spec.resize_size)
    else:  # border: the whole picture inside resize x resize, centred on a fill colour
        return _border(img, spec, resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    # reducing_gap: a cheap box-reduce first for big sources, then an antialiased resample
    img = img.resize((size, size), resample, box=box, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def _border(img: Image.Image, spec: CropSpec, resample: Image.Resampling) -> np.ndarray:
    width, height = img.size
    scale = spec.resize_size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    img = img.resize((new_w, new_h), resample, reducing_gap=3.0)
    canvas = Image.new("RGB", (spec.size, spec.size), spec.fill)
    canvas.paste(img, ((spec.size - new_w) // 2, (spec.size - new_h) // 2))
    return np.asarray(canvas, dtype=np.uint8)
