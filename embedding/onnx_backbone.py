"""``onnx:<path to .onnx>``: an image model exported to ONNX, run by ONNX Runtime.

The file is the weights: the store records ``onnx:<file name>`` and a content hash of the file
(``file:<name>:<sha256 prefix>``), so a copy elsewhere serves the same store and any other file
is refused. The model takes one NCHW float32 input (normalised) and returns (N, D) features.

An ONNX file says nothing about its preprocessing by itself; it is read from the file's
``metadata_props`` entry ``visual_search.preprocess`` (written by ``export`` below, from the
source library's own config), or from a ``<file>.preprocess.json`` beside it:
``{"crop": {"size": 224, "resize": 256, "mode": "center", "interpolation": "bicubic"},
"mean": [...], "std": [...]}`` (``crop`` as ``embedding.preprocess.CropSpec``).

``python -m embedding.onnx_export timm:<name> out.onnx [--weights W]`` exports a timm (or any
``--model``) image tower with its preprocessing, for machines that run ONNX Runtime only.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from embedding.preprocess import CropSpec
from embedding.towers import Backbone
from embedding.weights import file_tag

PREPROCESS_KEY = "visual_search.preprocess"


class OnnxModule(nn.Module):
    """An ONNX Runtime session as a module: tensors in, tensors out (no parameters to move)."""

    def __init__(self, path: str, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: x.float().contiguous().cpu().numpy()}
        (out,) = self.session.run(None, feed)[:1]
        return torch.from_numpy(np.asarray(out, np.float32)).to(x.device)


def load_onnx(name: str, weights: str, threads: int | None = None) -> Backbone:
    path = name.removeprefix("onnx:")
    if weights not in ("default", path):
        raise ValueError(f"model {name!r}: an ONNX file is its own weights; leave weights default")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model {name!r}: {path} does not exist")
    pre = _preprocess_of(path)
    return Backbone(
        "onnx:" + os.path.basename(path),
        file_tag(path),
        OnnxModule(path, threads),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        crop=CropSpec.of(pre["crop"]),
        runs_on_torch=False,
    )


def _preprocess_of(path: str) -> dict:
    import onnx

    model = onnx.load(path, load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == PREPROCESS_KEY:
            return json.loads(prop.value)
    sidecar = path + ".preprocess.json"
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            return json.load(f)
    raise ValueError(
        f"{path} does not say how to preprocess images: add metadata_props "
        f"{PREPROCESS_KEY!r} or {sidecar} (crop, mean, std; see embedding.onnx_backbone)"
    )
