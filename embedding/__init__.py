"""The embedding model, shared by the batch job and the query path so both see identical pixels.

``preprocess`` turns bytes into a fixed-size uint8 crop (cheap to ship between Ray workers);
``backbones`` knows which networks exist and how to load their weights offline; ``model`` runs a
backbone on batches of crops and returns L2-normalised float32 vectors.
"""

from embedding.preprocess import ImageError, decode_image, prepare

__all__ = ["Embedder", "ModelConfig", "ImageError", "decode_image", "prepare"]


def __getattr__(name: str):
    """``Embedder`` and ``ModelConfig`` import torch only when asked for: a process that only
    decodes (a Ray Data decode task, an HTTP ingress) then starts ~2 s faster and ~300 MB lighter.
    """
    if name in ("Embedder", "ModelConfig"):
        from embedding import model

        return getattr(model, name)
    raise AttributeError(f"module 'embedding' has no attribute {name!r}")
