"""Export a backbone's image tower to ONNX, its preprocessing written into the file.

``python -m embedding.onnx_export timm:<name> out.onnx [--weights W]``; the file then runs as
``--model onnx:out.onnx`` (``embedding.onnx_backbone``) where only ONNX Runtime is wanted.
"""

from __future__ import annotations

import argparse
import json

import torch

from embedding.backbones import load_backbone
from embedding.onnx_backbone import PREPROCESS_KEY


def export(model: str, path: str, weights: str = "default", opset: int = 17) -> str:
    """Export ``model``'s image tower to ``path`` with its preprocessing in the file."""
    backbone = load_backbone(model, weights)
    module = backbone.module.eval()
    size = backbone.image_size
    example = torch.zeros(1, 3, size, size)
    # the TorchScript exporter: the torch.export one needs onnxscript, which nothing else needs
    torch.onnx.export(
        module,
        (example,),
        path,
        input_names=["image"],
        output_names=["features"],
        dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    import onnx

    exported = onnx.load(path)
    preprocess = {"crop": backbone.crop.to_dict(), "mean": backbone.mean, "std": backbone.std}
    entry = exported.metadata_props.add()
    entry.key, entry.value = PREPROCESS_KEY, json.dumps(preprocess)
    entry = exported.metadata_props.add()
    entry.key, entry.value = "visual_search.source", f"{model}@{backbone.weights_tag}"
    onnx.save(exported, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a backbone's image tower to ONNX.")
    p.add_argument("model", help="e.g. timm:vit_small_patch14_dinov2")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--weights", default="default")
    args = p.parse_args(argv)
    print(export(args.model, args.out, args.weights))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
