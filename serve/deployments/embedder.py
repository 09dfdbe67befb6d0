"""QueryEmbedder: the batch job's model, run on query crops, micro-batched across requests.

The only serving process that imports torch (the ingress sends it uint8 crops, made by
``serve.http.crop`` without torch, and texts for models with a text tower: ``embed_text``).

Concurrent queries arriving within ``batch_wait_timeout_s`` of each other share one forward pass
(``@serve.batch``): on a GPU that is nearly free throughput, on a CPU it still saves the per-call
overhead. The model module and the crop are the batch job's own (``embedding``), and the replica
refuses to start if its model is not the one that embedded the catalogue.
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from embedding.config import ModelConfig
from embedding.model import Embedder  # torch: this deployment is the only one that runs a model


class ModelMismatch(RuntimeError):
    """The query model differs from the catalogue's: their vectors are not comparable."""


def check_model(name: str, weights_tag: str, dim: int | None, expected: dict | None) -> None:
    """Compare a loaded model with the manifest's ``{"model", "weights", "dim"}``."""
    if not expected:
        return
    want = (expected["model"], expected["weights"], expected.get("dim"))
    have = (name, weights_tag, dim if expected.get("dim") is not None else None)
    if have != want:
        raise ModelMismatch(
            f"the query model is {name}@{weights_tag} ({dim}-d) but the catalogue was embedded "
            f"with {want[0]}@{want[1]} ({want[2]}-d); set model/weights in the serve config to "
            "the catalogue's, or re-embed the catalogue"
        )


@serve.deployment(name="QueryEmbedder")
class QueryEmbedder:
    def __init__(
        self,
        model: ModelConfig,
        expected: dict | None = None,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.005,
    ):
        self.embedder = Embedder(model)
        check_model(self.embedder.name, self.embedder.weights_tag, self.embedder.dim, expected)
        for batched in (self.embed, self.embed_text):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = 0
        self.images = 0
        self.texts = 0

    def info(self) -> dict:
        return {
            "model": self.embedder.name,
            "weights": self.embedder.weights_tag,
            "dim": self.embedder.dim,
            "image_size": self.embedder.image_size,
            "crop": self.embedder.crop.to_dict(),  # the ingress cuts query crops by it
            "text": self.embedder.has_text,
            "text_error": None if self.embedder.has_text else self.embedder.text_refusal(),
            "device": str(self.embedder.device),
            "batches": self.batches,
            "images": self.images,
            "texts": self.texts,
        }

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """One (H, W, 3) uint8 crop per call -> its (D,) float32 unit vector."""
        batch = np.stack(crops)
        # off the event loop, so requests keep queueing into the next batch meanwhile
        vectors = await asyncio.to_thread(self.embedder.embed, batch)
        self.batches += 1
        self.images += len(crops)
        return list(vectors)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed_text(self, texts: list[str]) -> list[np.ndarray]:
        """One text per call -> its (D,) float32 unit vector in the images' space (models with
        a text tower: ``info()["text"]``; the ingress refuses text for the others)."""
        vectors = await asyncio.to_thread(self.embedder.embed_text, texts)
        self.batches += 1
        self.texts += len(texts)
        return list(vectors)
