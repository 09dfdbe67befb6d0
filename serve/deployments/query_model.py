"""The ingress's view of the QueryEmbedder: image crops, texts and mixed queries to one vector.

Plain code over a DeploymentHandle (no Serve state of its own), so the ingress stays a thin set
of routes. Images are cropped here, in the ingress, exactly as the batch job crops them (by the
model's ``CropSpec``, read once from the embedder's ``info``); texts go to the embedder's text
tower. A mixed query (``text`` with an image, an id or a vector) is
``normalize((1 - w) * query + w * text)`` of the two unit vectors, ``w = text_weight``
(default ``DEFAULT_TEXT_WEIGHT``): 0 is the image alone, 1 the text alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from serve.http.crop import image_crop
from serve.http.errors import ApiError
from serve.http.limits import Limits
from serve.http.validate import DEFAULT_TEXT_WEIGHT
from serve.scatter import call_with_deadline


def mix(query: np.ndarray, text: np.ndarray, weight: float) -> np.ndarray:
    """The unit vector between ``query`` and ``text`` (both unit vectors) at ``weight``."""
    mixed = (1.0 - weight) * np.asarray(query, np.float32) + weight * np.asarray(text, np.float32)
    norm = float(np.linalg.norm(mixed))
    if norm < 1e-6:  # exactly opposite at 0.5: no direction left to search by
        raise ApiError(
            422, "invalid_parameter", "text and query cancel out at this text_weight; change it"
        )
    return mixed / norm


class QueryModel:
    """``handle``: the QueryEmbedder deployment (None: the app takes no image or text
    queries); ``timeout_s``: the embed deadline."""

    def __init__(self, handle, timeout_s: float, to_thread: Callable = asyncio.to_thread):
        self.handle = handle
        self.timeout_s = timeout_s
        self.to_thread = to_thread
        self._info: dict | None = None

    async def info(self) -> dict:
        """The embedder's ``info`` (model, crop, text tower), fetched once."""
        if self._info is None:
            ok, info = await call_with_deadline(self.handle.info.remote(), self.timeout_s)
            if not ok:
                raise ApiError(503, "embedder_unavailable", f"the query embedder failed: {info}")
            self._info = info
        return self._info

    async def image(self, image: bytes, limits: Limits, instead: str) -> np.ndarray:
        """The vector of an uploaded ``image``; ``instead``: what an app without a model takes."""
        if self.handle is None:
            raise ApiError(
                501,
                "image_queries_disabled",
                "this app serves vectors that no image model made (image_queries: false); "
                + instead,
            )
        crop = (await self.info())["crop"]
        pixels = await self.to_thread(image_crop, image, crop, limits)
        return await self._call(self.handle.embed.remote(pixels))

    async def text(self, text: str) -> np.ndarray:
        """The vector of ``text``; 422 ``no_text_encoder`` when the model has no text tower."""
        if self.handle is None:
            raise ApiError(
                422,
                "no_text_encoder",
                "this app runs no query model (image_queries: false): send a vector or an id",
            )
        info = await self.info()
        if not info.get("text"):
            raise ApiError(422, "no_text_encoder", info.get("text_error") or "no text tower")
        return await self._call(self.handle.embed_text.remote(text))

    async def with_text(
        self,
        query: np.ndarray | None,
        text: str,
        weight: float | None,
        into_store_space: Callable[[np.ndarray], Awaitable[np.ndarray]] | None = None,
    ) -> np.ndarray:
        """``text``'s vector, mixed into ``query`` (when there is one) at ``weight``. A query
        read back by id from a store with a transform (``index.ann.transform``) is in the
        store's reduced space: the text's vector is brought there (``into_store_space``)."""
        vector = await self.text(text)
        if query is None:
            return vector
        if len(vector) != len(query) and into_store_space is not None:
            vector = await into_store_space(vector)
        return mix(query, vector, DEFAULT_TEXT_WEIGHT if weight is None else weight)

    async def _call(self, call) -> np.ndarray:
        ok, vector = await call_with_deadline(call, self.timeout_s)
        if not ok:
            raise ApiError(503, "embedder_unavailable", f"the query embedder failed: {vector}")
        return vector
