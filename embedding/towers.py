"""What a loaded backbone is, whatever library made it: an image tower, maybe a text tower.

``embedding.backbones`` (torchvision, EfficientNet-Lite), ``embedding.timm_backbone``,
``embedding.open_clip_backbone`` and ``embedding.onnx_backbone`` each return a ``Backbone``;
``embedding.model.Embedder`` runs it the same way in the batch job's actors and in the query
embedder replica.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from embedding.preprocess import CropSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TextTower(nn.Module):
    """Texts -> (N, D) features in the image tower's space (CLIP, SigLIP).

    ``tokenize``: list of strings -> (N, context) int64 tokens, on the CPU; ``encode``: tokens on
    the model's device -> features. A module, so ``.to(device)`` moves it with the image tower.
    """

    def __init__(self, model: nn.Module, tokenize: Callable[[list[str]], torch.Tensor]):
        super().__init__()
        self.model = model
        self.tokenize = tokenize

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


@dataclass
class Backbone:
    name: str
    weights_tag: str
    module: nn.Module  # NCHW float (normalised) -> (N, D) features, classifier removed
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # the library's own resize/crop/interpolation; None: the torchvision centre crop of image_size
    crop: CropSpec | None = None
    text: TextTower | None = None  # a text tower in the same vector space, if the model has one
    text_error: str | None = None  # why a model with a text tower cannot take text here
    runs_on_torch: bool = True  # False: an ONNX Runtime session (no half, no channels-last)

    def __post_init__(self) -> None:
        if self.crop is None:
            self.crop = CropSpec(size=self.image_size)
        self.image_size = self.crop.size
