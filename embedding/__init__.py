"""The embedding model, shared by the batch job and the query path so both see identical pixels.

``preprocess`` turns bytes into a fixed-size uint8 crop (cheap to ship between Ray workers);
``backbones`` knows which networks exist and how to load their weights offline; ``model`` runs a
backbone on batches of crops and returns L2-normalised float32 vectors.
"""

from embedding.model import Embedder, ModelConfig
from embedding.preprocess import ImageError, decode_image, prepare

__all__ = ["Embedder", "ModelConfig", "ImageError", "decode_image", "prepare"]
