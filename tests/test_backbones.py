"""Pluggable backbones (issue #25, part 1): timm, open_clip and ONNX models beside torchvision's.

Tiny randomly initialised models of each kind (``harness.tiny_models``; nothing downloaded): their
preprocessing is their library's, their tags keep stores to one vector space, missing weights are
named, and each kind runs through the embedding job, the index build and the query path's crop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedding.backbones import load_backbone
from embedding.config import ModelConfig, canonical_model_name, model_kind
from embedding.model import Embedder, NoTextEncoder
from embedding.preprocess import prepare
from embedding.weights import WeightsUnavailable
from harness import embed_samples as samples
from harness.model_runs import embed_and_build, self_retrieval
from harness.tiny_models import TIMM_TINY, onnx_tiny, open_clip_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "timm": TIMM_TINY,
        "open_clip": open_clip_tiny(root / "clip"),
        "onnx": onnx_tiny(root / "test_vit.onnx"),
    }


def _normalised(crop: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_preprocessing_is_the_libraries_own(tiny, caltech_dir):
    """Our crop of a photo is what timm's and open_clip's own eval transforms make of it."""
    import timm
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from timm.data import create_transform, resolve_model_data_config

    photo = Image.open(samples.caltech_subset(caltech_dir, 1)[0]).convert("RGB")
    timm_model = load_backbone(TIMM_TINY, "none")
    data = resolve_model_data_config(timm.create_model("test_vit", num_classes=0))
    assert (timm_model.image_size, timm_model.mean, timm_model.std) == (
        data["input_size"][1],
        data["mean"],
        data["std"],
    )
    assert timm_model.crop.interpolation == data["interpolation"] == "bicubic"
    theirs = create_transform(**data)(photo)
    ours = _normalised(prepare(photo, timm_model.crop), data["mean"], data["std"])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.02  # same box, same filter; rounding apart

    clip = load_backbone(tiny["open_clip"], "none")
    cfg = PreprocessCfg(**clip.module.model.visual.preprocess_cfg)
    theirs = image_transform_v2(cfg, is_train=False)(photo)
    ours = _normalised(prepare(photo, clip.crop), cfg.mean, cfg.std)
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert (ours - theirs).abs().mean() < 0.03

    onnx = load_backbone(tiny["onnx"])  # the exported file carries timm's preprocessing
    assert (onnx.crop, onnx.mean, onnx.std) == (timm_model.crop, timm_model.mean, timm_model.std)


def test_tags_keep_vector_spaces_apart(tiny, tmp_path):
    timm_net = load_backbone(TIMM_TINY, "none").module
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(timm_net.state_dict(), a)
    torch.save({k: v + 1 for k, v in timm_net.state_dict().items()}, b)
    tag_a, tag_b = (load_backbone(TIMM_TINY, str(p)).weights_tag for p in (a, b))
    assert tag_a.startswith("file:a.pth:") and tag_b.startswith("file:b.pth:") and tag_a != tag_b
    # an open_clip folder's config is part of the tag: another architecture, another space
    other = open_clip_tiny(tmp_path / "clip")
    config = tmp_path / "clip" / "open_clip_config.json"
    config.write_text(config.read_text().replace('"layers": 2', '"layers": 1', 1))
    tags = {load_backbone(name, "none").weights_tag for name in (tiny["open_clip"], other)}
    assert len(tags) == 2
    # where a file lies is not part of a store's model name; its content is
    assert canonical_model_name("onnx:/x/y/model.onnx") == "onnx:model.onnx"
    assert canonical_model_name("open_clip:local-dir:/a/clip/") == "open_clip:local-dir:clip"
    assert load_backbone(tiny["onnx"]).weights_tag.startswith("file:test_vit.onnx:")
    assert [model_kind(n) for n in ("resnet18", "efficientnet_lite0", *tiny.values())] == [
        "torchvision",
        "lite",
        "timm",
        "open_clip",
        "onnx",
    ]
    for bad in ("timm:", "onnx:model.bin", "clip:ViT-B-32", "nope"):
        with pytest.raises(ValueError):
            ModelConfig(name=bad)


def test_missing_weights_are_named_not_replaced(monkeypatch, tmp_path):
    """Offline, no cached file: an error naming the file and the folder, at once (no retries),
    never random weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsUnavailable, match=r"model\.safetensors.*timm/test_vit"):
        load_backbone(TIMM_TINY)
    with pytest.raises(WeightsUnavailable, match=r"open_clip_model\.safetensors.*openai"):
        load_backbone("open_clip:ViT-B-32")  # default = the arch's first tag, openai
    with pytest.raises(WeightsUnavailable, match="no weights in"):
        load_backbone(open_clip_tiny(tmp_path / "clip"))  # a config without its weights
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(b"")
    with pytest.raises(ValueError):
        load_backbone(f"onnx:{bare}")


def test_text_tower_where_the_model_has_one(tiny):
    from embedding.open_clip_backbone import _text_tower

    clip = Embedder(ModelConfig(name=tiny["open_clip"], weights="none", threads=1))
    texts = clip.embed_text(["red shoes", "a cat on a sofa"])
    assert texts.shape == (2, clip.dim) and np.allclose(np.linalg.norm(texts, axis=1), 1, 1e-5)
    assert not np.allclose(texts[0], texts[1])
    vit = Embedder(ModelConfig(name=TIMM_TINY, weights="none", threads=1))
    assert not vit.has_text
    with pytest.raises(NoTextEncoder, match="no text tower"):
        vit.embed_text(["red shoes"])

    class TwoTowers:  # SigLIP's tokenizer needs transformers and a download: said, not raised
        def encode_text(self, tokens):
            raise AssertionError("never called")

    import open_clip

    tower, why = _text_tower(open_clip, TwoTowers(), "ViT-B-16-SigLIP")
    assert tower is None and "tokenizer cannot be loaded" in why


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["timm", "onnx"])  # open_clip: tests/test_text_search.py
def test_each_kind_through_embed_build_and_the_query_path(
    kind, tiny, ray_local, caltech_dir, tmp_path
):
    """The batch job's actors and the query path use one Embedder: a catalogue photo sent as a
    query (the ingress's crop) finds itself first in the built index, for every kind."""
    photos = samples.caltech_subset(caltech_dir, 12)
    weights = "default" if kind == "onnx" else "none"  # an ONNX file is its own weights
    built = embed_and_build(tiny[kind], weights, photos, tmp_path / "store")
    assert built.manifest.model == canonical_model_name(tiny[kind])
    assert built.embedder.model_tag == built.manifest.model_tag
    assert self_retrieval(built, photos[:4]) == 1.0
