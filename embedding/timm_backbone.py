"""``timm:<name>``: any image model of timm's registry (DINOv2, ViT, ConvNeXt, EfficientNet...).

Weights (``weights``):
- ``"default"``: the name's pretrained weights (``timm:vit_small_patch14_dinov2.lvd142m`` picks a
  tag), found in the Hugging Face cache (``$HF_HOME/hub``, where timm downloads them) or, for
  weights timm fetches by URL, in ``$TORCH_HOME/hub/checkpoints``; downloaded only where the hub
  answers, else ``WeightsUnavailable`` naming the file and the folder.
- a path to a checkpoint (``.safetensors``, ``.bin``, ``.pth``, ``.npz``): loaded by timm itself
  (``pretrained_cfg_overlay={"file": path}``), through the model's own checkpoint filter.
- ``"none"``: random initialisation, for tests.

Preprocessing is timm's: ``timm.data.resolve_model_data_config`` (input size, interpolation,
crop_pct, crop_mode, mean, std), never a copy of it. Features are the model's pooled
pre-classifier output (``num_classes=0``): DINOv2's CLS token, a ConvNeXt's pooled map.
"""

from __future__ import annotations

import math
import os

from embedding.preprocess import CropSpec
from embedding.towers import Backbone
from embedding.weights import TIMM_FILES, file_tag, hf_cache_dir, hf_cached, hub_reachable, missing


def load_timm(name: str, weights: str) -> Backbone:
    import timm

    arch = name.removeprefix("timm:")
    if not timm.is_model(arch.split(".")[0]):
        raise ValueError(f"model {name!r}: timm knows no model {arch.split('.')[0]!r}")
    if weights == "none":
        net = timm.create_model(arch, pretrained=False, num_classes=0)
        tag = "random"
    elif weights == "default":
        net, tag = _pretrained(timm, arch)
    else:
        tag = file_tag(weights)
        net = timm.create_model(
            arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": weights}
        )
    return Backbone(name, tag, net, **_preprocessing(timm, net))


def _pretrained(timm, arch: str):
    """The model with its default pretrained weights, from a cache or (online) the hub."""
    from timm.models import get_pretrained_cfg

    base, _, want_tag = arch.partition(".")
    cfg = get_pretrained_cfg(arch) or get_pretrained_cfg(base)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"timm:{arch} has no pretrained weights; pass weights=<file> or 'none'")
    if cfg.hf_hub_id:
        source = f"hf:{cfg.hf_hub_id}"
        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else TIMM_FILES
        path = hf_cached(cfg.hf_hub_id, filenames)
        where = f"{hf_cache_dir()} (Hugging Face repository {cfg.hf_hub_id})"
    else:
        import torch

        source = f"url:{os.path.basename(cfg.url)}"
        filenames = (os.path.basename(cfg.url),)
        candidate = os.path.join(torch.hub.get_dir(), "checkpoints", filenames[0])
        path = candidate if os.path.isfile(candidate) else None
        where = os.path.dirname(candidate)
    if path is not None:
        net = timm.create_model(
            arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": path}
        )
        return net, source
    if not hub_reachable():
        raise missing(f"timm:{arch}", filenames[0], where, f"pass weights=<path to {filenames[0]}>")
    return timm.create_model(arch, pretrained=True, num_classes=0), source


def _preprocessing(timm, net) -> dict:
    """Backbone fields from timm's data config for this model (not a copy of its constants)."""
    from timm.data import resolve_model_data_config

    data = resolve_model_data_config(net)
    _, height, width = data["input_size"]
    if height != width:
        raise ValueError(f"timm model with a non-square input {height}x{width}: not supported")
    crop_pct = data.get("crop_pct") or 0.875
    mode = data.get("crop_mode") or "center"
    mean = tuple(float(v) for v in data["mean"])
    crop = CropSpec(
        size=int(height),
        resize=math.floor(height / crop_pct),  # timm's transforms_imagenet_eval: scale_size
        mode=mode,
        interpolation="bilinear" if data["interpolation"] == "bilinear" else "bicubic",
        fill=tuple(round(255 * v) for v in mean),  # timm pads 'border' with the mean colour
        long_side="floor",  # torchvision's Resize, as timm's eval transform uses it
    )
    return {"mean": mean, "std": tuple(float(v) for v in data["std"]), "crop": crop}
