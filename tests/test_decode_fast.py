"""The simplejpeg fast path of ``embedding.decode_image`` gives PIL's pixels bit for bit, and
leaves every JPEG it should not handle (EXIF, CMYK, broken) to the PIL path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from embedding import ImageError, decode_image
from embedding import preprocess as pp

pytestmark = pytest.mark.skipif(pp.simplejpeg is None, reason="simplejpeg is not installed")


def jpeg(img: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90, **save)
    return out.getvalue()


def test_same_pixels_as_pil_at_every_draft_scale(caltech_dir):
    files = sorted((caltech_dir / "101_ObjectCategories").glob("*/*.jpg"))
    files = files[:: max(1, len(files) // 30)]  # ~30 photos from every part of the tree
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (1200, 1700, 3), np.uint8)).filter(ImageFilter.BLUR)
    datas = [f.read_bytes() for f in files] + [jpeg(big), jpeg(big.convert("L"))]
    for data in datas:
        for draft in (None, 256, 100, 30):  # scales 1, 2, 4 and 8 on the large one
            fast = pp._fast_jpeg(data, pp.DEFAULT_MAX_PIXELS, draft)
            slow = pp._decode_pil(data, pp.DEFAULT_MAX_PIXELS, draft)
            assert fast is not None and fast.mode == "RGB" == slow.mode
            assert fast.size == slow.size and fast.info["source_size"] == slow.info["source_size"]
            np.testing.assert_array_equal(np.asarray(fast), np.asarray(slow))


def test_exif_cmyk_and_broken_jpegs_take_the_pil_path():
    img = Image.fromarray(np.full((40, 60, 3), 120, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: only PIL's path applies it
    rotated = jpeg(img, exif=exif.tobytes())
    assert pp._fast_jpeg(rotated, pp.DEFAULT_MAX_PIXELS, None) is None
    assert decode_image(rotated).size == (40, 60)
    cmyk = jpeg(img.convert("CMYK"))
    assert pp._fast_jpeg(cmyk, pp.DEFAULT_MAX_PIXELS, None) is None
    assert decode_image(cmyk).mode == "RGB"
    data = jpeg(Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), np.uint8)))
    with pytest.raises(ImageError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.reason == "truncated"
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=1000)
    assert e.value.reason == "decompression_bomb"
