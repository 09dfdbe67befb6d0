"""``open_clip:<arch>``: CLIP, SigLIP and friends, with the image tower and the text tower.

The arch is one of open_clip's names (``open_clip:ViT-B-32``, ``open_clip:ViT-B-16-SigLIP``) or
open_clip's own schemas: ``open_clip:local-dir:/path`` (a folder with ``open_clip_config.json``
and its weights, e.g. a Hugging Face snapshot of ``timm/ViT-B-16-SigLIP``) or
``open_clip:hf-hub:org/repo`` (that repository in the Hugging Face cache).

Weights (``weights``):
- ``"default"``: a named arch's first pretrained tag in open_clip's list (ViT-B-32: ``openai``);
  a ``local-dir`` folder's own checkpoint; an ``hf-hub`` repository's cached checkpoint.
- an open_clip pretrained tag (``laion2b_s34b_b79k``): its file from the Hugging Face cache or
  ``~/.cache/clip``; downloaded only where the hub answers, else ``WeightsUnavailable`` naming it.
- a path to a checkpoint file; ``"none"``: random initialisation, for tests.

Preprocessing is the model's ``visual.preprocess_cfg`` as open_clip sets it (size, mean, std,
interpolation, resize_mode), merged with the pretrained tag's. The tokenizer is open_clip's: for
CLIP archs its BPE vocabulary ships inside the package (offline); SigLIP's tokenizers need
``transformers`` and a Hugging Face download, so where they cannot load the image tower still
works and text queries are refused with the reason (``Backbone.text_error``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torch import nn

from embedding.preprocess import CropSpec
from embedding.towers import Backbone, TextTower
from embedding.weights import (
    OPEN_CLIP_FILES,
    WeightsUnavailable,
    file_tag,
    hf_cache_dir,
    hf_cached,
    hub_reachable,
    missing,
)

LOCAL, HUB = "local-dir:", "hf-hub:"
_TAG_PREPROCESS = ("mean", "std", "interpolation", "resize_mode")
_RESIZE_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}


class _ImageTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.encode_image(x)


def load_open_clip(name: str, weights: str) -> Backbone:
    import open_clip

    arch = name.removeprefix("open_clip:")
    if arch.startswith(HUB):
        arch = _cached_hub_dir(arch.removeprefix(HUB), weights)
    if arch.startswith(LOCAL):
        model, tag = _local_dir(open_clip, arch, weights)
    else:
        model, tag = _named(open_clip, arch, weights)
    model.eval()
    text, text_error = _text_tower(open_clip, model, arch)
    return Backbone(
        name,
        tag,
        _ImageTower(model),
        text=text,
        text_error=text_error,
        **_preprocessing(model.visual.preprocess_cfg),
    )


def _named(open_clip, arch: str, weights: str):
    if arch not in open_clip.list_models():
        raise ValueError(f"model open_clip:{arch}: open_clip knows no arch {arch!r}")
    if weights == "none":
        return open_clip.create_model(arch, pretrained=None, pretrained_text=False), "random"
    if os.path.isfile(weights):
        return open_clip.create_model(arch, pretrained=weights), file_tag(weights)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    tag = tags[0] if weights == "default" and tags else weights
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise WeightsUnavailable(
            f"open_clip:{arch}: {weights!r} is neither a file nor a pretrained tag "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    path, filename, where = _cached_tag_file(cfg)
    if path is None and not hub_reachable():
        raise missing(f"open_clip:{arch} {tag}", filename, where, "pass weights=<path to it>")
    if path is None:  # online: open_clip downloads into its cache
        return open_clip.create_model(arch, pretrained=tag), f"open_clip:{tag}"
    # the tag's own preprocessing (mean, std, interpolation, resize mode), as create_model
    # merges it when it downloads the tag itself
    model = open_clip.create_model(
        arch,
        pretrained=path,
        force_quick_gelu=bool(cfg.get("quick_gelu", False)),
        force_preprocess_cfg={k: cfg[k] for k in _TAG_PREPROCESS if k in cfg},
    )
    return model, f"open_clip:{tag}"


def _cached_tag_file(cfg: dict) -> tuple[str | None, str, str]:
    """(cached path or None, the file name, where it belongs) for a pretrained tag's config."""
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        filenames = (filename,) if filename else OPEN_CLIP_FILES
        where = f"{hf_cache_dir()} (Hugging Face repository {repo})"
        return hf_cached(repo, filenames), filenames[0], where
    url = cfg.get("url", "")
    filename = os.path.basename(url)
    where = os.path.expanduser("~/.cache/clip")
    path = os.path.join(where, filename)
    return (path if os.path.isfile(path) else None), filename, where


def _cached_hub_dir(repo: str, weights: str) -> str:
    """``hf-hub:org/repo`` as the ``local-dir:`` of its cached snapshot (open_clip itself would
    ask the hub for the config first, retrying for a minute without internet)."""
    found = hf_cached(repo, OPEN_CLIP_FILES) or hf_cached(repo, ("open_clip_config.json",))
    if found is not None:
        return LOCAL + os.path.dirname(found)
    if weights == "none" or not hub_reachable():
        raise missing(
            f"open_clip:hf-hub:{repo}",
            "open_clip_config.json and open_clip_model.safetensors",
            f"{hf_cache_dir()} (Hugging Face repository {repo})",
            f"download the repository's files into a folder and use open_clip:{LOCAL}<folder>",
        )
    from huggingface_hub import snapshot_download

    return LOCAL + snapshot_download(repo)


def _local_dir(open_clip, arch: str, weights: str):
    folder = Path(arch.removeprefix(LOCAL))
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise ValueError(f"model open_clip:{arch}: {config} does not exist")
    # the architecture is in the config file: a different config is a different vector space
    cfg_tag = "cfg-" + hashlib.sha256(config.read_bytes()).hexdigest()[:12]
    if weights == "none":
        model = open_clip.create_model(arch, load_weights=False, pretrained_text=False)
        return model, f"random+{cfg_tag}"
    if weights != "default":
        model = open_clip.create_model(arch, load_weights=False, pretrained_text=False)
        open_clip.load_checkpoint(model, weights)
        return model, f"{file_tag(weights)}+{cfg_tag}"
    found = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
    if not found:
        raise WeightsUnavailable(
            f"open_clip:{arch}: no weights in {folder}: put {OPEN_CLIP_FILES[0]} there "
            "(or pass weights=<file>)"
        )
    model = open_clip.create_model(arch)  # open_clip picks the folder's checkpoint itself
    chosen = open_clip.factory._find_checkpoint_in_dir(folder)
    return model, f"{file_tag(chosen)}+{cfg_tag}"


def _text_tower(open_clip, model, arch: str) -> tuple[TextTower | None, str | None]:
    if not hasattr(model, "encode_text"):
        return None, None
    try:
        tokenizer = open_clip.get_tokenizer(arch)
        tokenizer(["a probe"])  # SigLIP tokenizers fetch their vocabulary on first use
    except Exception as e:  # ImportError (transformers), a download that cannot happen here
        return None, (
            f"the open_clip:{arch} tokenizer cannot be loaded here ({type(e).__name__}: {e}); "
            "SigLIP tokenizers need transformers and their vocabulary from Hugging Face"
        )
    return TextTower(model, tokenizer), None


def _preprocessing(cfg: dict) -> dict:
    """Backbone fields from open_clip's ``visual.preprocess_cfg`` (what its transforms use)."""
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[-1]:
            raise ValueError(f"open_clip model with a non-square input {size}: not supported")
        size = size[0]
    mode = cfg.get("resize_mode", "shortest")
    if mode not in _RESIZE_MODES:
        raise ValueError(f"open_clip resize_mode {mode!r}: expected {tuple(_RESIZE_MODES)}")
    fill = int(cfg.get("fill_color", 0))
    crop = CropSpec(
        size=int(size),
        resize=int(size),  # open_clip resizes to the input size itself (no crop_pct)
        mode=_RESIZE_MODES[mode],
        interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
        fill=(fill, fill, fill),
        long_side="floor",  # torchvision's Resize, as open_clip's transform uses it
    )
    mean = tuple(float(v) for v in cfg["mean"])
    return {"mean": mean, "std": tuple(float(v) for v in cfg["std"]), "crop": crop}
