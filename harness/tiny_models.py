"""Tiny randomly initialised models of every backbone kind, made here (nothing is downloaded).

- timm: ``timm:test_vit`` (one of timm's own test models: 160 px, 64-d; its preprocessing is
  timm's registry config like any other model's);
- open_clip: a folder in open_clip's ``local-dir`` form (``open_clip_config.json``: a 2-layer
  ViT image tower and a 2-layer text tower, CLIP's tokenizer, which ships with open_clip);
- ONNX: ``timm:test_vit`` exported by ``embedding.onnx_export``, its preprocessing in the file.

Random weights put images in no meaningful space: what these show is the plumbing (the same
crops, vectors and tags through the batch job, the index and the query path), not quality.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

TIMM_TINY = "timm:test_vit"
# open_clip's own config schema (what a Hugging Face open_clip repository holds), made small
OPEN_CLIP_TINY_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 64,
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    },
    # CLIP's preprocessing as open_clip's pretrained configs state it (OPENAI_DATASET_MEAN/STD)
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def open_clip_tiny(folder: Path | str, embed_dim: int | None = None) -> str:
    """Write the tiny open_clip config into ``folder`` (``embed_dim``: the shared space's
    dimension, 32 by default); returns the ``--model`` name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(OPEN_CLIP_TINY_CONFIG))
    if embed_dim is not None:
        config["model_cfg"]["embed_dim"] = embed_dim
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return f"open_clip:local-dir:{folder}"


def onnx_tiny(path: Path | str) -> str:
    """Export ``timm:test_vit`` (random) to ``path``; returns the ``--model`` name."""
    from embedding.onnx_export import export

    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
            warnings.simplefilter("ignore")
            export(TIMM_TINY, str(path), weights="none")
    return f"onnx:{path}"
