"""Uploaded image bytes -> the model's input crop, exactly as the batch job makes it.

The pixels a query image becomes must be the catalogue's own: the same decode (JPEG draft at the
resize size, ``embedding.preprocess.decode_image``, with the caller's byte and pixel limits, so a
decompression bomb costs a header read) and the same crop (``prepare``, by the model's
``CropSpec``). A benchmark and a test pin this to the embedding job's path.
"""

from __future__ import annotations

import numpy as np

from embedding.preprocess import CropSpec, ImageError, decode_image, prepare
from serve.http.errors import IMAGE_ERROR_STATUS, ApiError
from serve.http.limits import Limits


def image_crop(data: bytes, crop: CropSpec | dict | int, limits: Limits) -> np.ndarray:
    """Uploaded bytes -> the model's uint8 input crop, exactly as the batch job prepares it
    (``pipelines.embed_stages.read_decode_batch``: JPEG draft decode at the resize size, then
    ``prepare`` by the model's ``CropSpec``; a bare int: the torchvision centre crop of that
    size), so a catalogue image uploaded as a query gets the catalogue's own vector."""
    spec = CropSpec.of(crop)
    try:
        img = decode_image(
            data,
            max_pixels=limits.max_pixels,
            max_bytes=limits.max_upload_bytes,
            draft_size=spec.draft_size,
        )
        return prepare(img, spec)
    except ImageError as e:
        detail = limits.over(e.detail) if e.reason == "decompression_bomb" else e.detail
        raise ApiError(IMAGE_ERROR_STATUS[e.reason], e.reason, detail) from None
