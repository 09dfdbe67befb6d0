"""Run a backbone on batches of uint8 crops and return L2-normalised float32 vectors.

One ``Embedder`` per process (a Ray Data actor, a Serve replica): it picks the device, threads,
channels-last layout and half precision on GPU, which together decide throughput on CPU and GPU.

A GPU that was granted but cannot be used (Ray scheduled the process for a ``GPU`` resource, but
torch sees no CUDA: a CPU-only torch, a missing driver, a fake GPU of Ray's test autoscaler) is
not fatal: the model runs on the CPU and the process says so once in its log.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image

from embedding.backbones import load_backbone
from embedding.config import ModelConfig  # torch-free; kept importable from here
from embedding.preprocess import prepare

log = logging.getLogger(__name__)
_warned_no_cuda = False


class NoTextEncoder(ValueError):
    """Text was asked of a model without a usable text tower (the reason is the message)."""


class Embedder:
    """A backbone on this process's device: uint8 crops (and, with a text tower, texts) in,
    unit vectors out. ``crop`` is the model's own ``CropSpec``: callers that cut crops elsewhere
    (the batch job's decode tasks, the HTTP ingress) get it as a dict (``crop.to_dict()``)."""

    def __init__(self, config: ModelConfig | None = None):
        self.config = config = config or ModelConfig()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = pick_device(config.device)
        if self.device.type == "cpu":
            tune_malloc()
        self.half = config.half if config.half is not None else self.device.type == "cuda"
        backbone = load_backbone(config.name, config.weights, config.threads)
        self.name = backbone.name
        self.weights_tag = backbone.weights_tag
        self.crop = backbone.crop
        self.image_size = backbone.image_size
        if not backbone.runs_on_torch:  # ONNX Runtime: float32 NCHW, its own device choice
            self.half = False
        channels_last = config.channels_last and backbone.runs_on_torch
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        dtype = torch.float16 if self.half else torch.float32
        self.dtype = dtype
        self.module = backbone.module.eval().to(self.device, dtype=dtype)
        self.module = self.module.to(memory_format=self.memory_format)
        self.text = backbone.text
        if self.text is not None:
            self.text = self.text.eval().to(self.device, dtype=dtype)
        self.text_error = backbone.text_error
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(backbone.mean, device=self.device, dtype=dtype).view(shape) * 255
        self.std = torch.tensor(backbone.std, device=self.device, dtype=dtype).view(shape) * 255
        self.dim = int(
            self.embed(np.zeros((1, self.image_size, self.image_size, 3), np.uint8)).shape[1]
        )

    @property
    def model_tag(self) -> str:
        return f"{self.name}@{self.weights_tag}"

    @property
    def has_text(self) -> bool:
        return self.text is not None

    def text_refusal(self) -> str:
        """Why this model takes no text (for a 422 ``no_text_encoder``)."""
        return self.text_error or (
            f"{self.model_tag} has no text tower: text queries need a model with one "
            "(open_clip:<arch>, e.g. CLIP)"
        )

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D) float32 unit vectors in the image vectors' space (CLIP-style
        models); ``NoTextEncoder`` for a model without a usable text tower."""
        if self.text is None:
            raise NoTextEncoder(self.text_refusal())
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.text.tokenize(list(texts)).to(self.device)
        features = self.text(tokens).float()
        return torch.nn.functional.normalize(features, dim=1).cpu().numpy()

    @torch.inference_mode()
    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 crops -> (N, D) float32, each row of unit L2 norm."""
        if crops.ndim != 4 or crops.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) uint8 crops, got {crops.shape}")
        if len(crops) == 0:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        x = torch.from_numpy(np.ascontiguousarray(crops))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(self.dtype)  # NHWC memory is already channels-last NCHW
        x = ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        features = self.module(x).float()
        features = torch.nn.functional.normalize(features, dim=1)
        return features.cpu().numpy()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Decoded images -> vectors, with exactly the batch job's crop."""
        crops = np.stack([prepare(img, self.crop) for img in images])
        return self.embed(crops)


def pick_device(wanted: str) -> torch.device:
    """``wanted`` ("auto", "cpu", "cuda", "cuda:1"...) as a device this process can use.

    CUDA asked for (or a GPU granted by Ray: ``CUDA_VISIBLE_DEVICES`` names one) while torch
    has no CUDA falls back to the CPU with one warning per process, instead of failing.
    """
    global _warned_no_cuda
    if wanted != "auto" and torch.device(wanted).type != "cuda":
        return torch.device(wanted)
    if torch.cuda.is_available():
        return torch.device("cuda" if wanted == "auto" else wanted)
    granted = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if (wanted != "auto" or granted not in ("", "-1", "NoDevFiles")) and not _warned_no_cuda:
        _warned_no_cuda = True
        log.warning(
            "GPU requested (device %r, CUDA_VISIBLE_DEVICES=%r) but torch %s sees no CUDA "
            "device (built with CUDA %s): embedding on the CPU instead",
            wanted,
            granted,
            torch.__version__,
            torch.version.cuda,
        )
    return torch.device("cpu")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_malloc_tuned = False

# The same settings as environment variables, for processes started to run a model (a Ray
# actor's runtime_env). Needed there: Ray Data calls a UDF on a thread that already has its own
# malloc arena when the actor's __init__ runs, and mallopt cannot move it to the main one
# (measured in a Ray Data actor: 65 img/s with mallopt alone, 109 with these variables).
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


def tune_malloc() -> bool:
    """Keep freed activation memory in the process instead of returning it to the kernel.

    glibc serves allocations above 32 MiB (a batch-32 224 px activation is ~50 MiB) with a fresh
    mmap and gives it back on free, so every layer of every batch page-faults its output in
    again: measured on the 2-core box, EfficientNet-Lite0 spent more time in the kernel than in
    the model (37 img/s at batch 32; 2 M page faults per 256 images). Raising the mmap and trim
    thresholds and using one arena (threads included) gave ~130 img/s. Process-wide and
    glibc-only; a no-op elsewhere, or when VISUAL_SEARCH_MALLOC_TUNE=0. The cost: the process
    keeps its peak heap (a few hundred MB for a model) rather than shrinking between batches.
    """
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("VISUAL_SEARCH_MALLOC_TUNE", "1") == "0":
        return _malloc_tuned
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        one_gib = 1 << 30
        ok = libc.mallopt(_M_MMAP_THRESHOLD, one_gib) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, one_gib) == 1
        libc.mallopt(_M_ARENA_MAX, 1)  # best effort: threads that already have an arena keep it
        _malloc_tuned = bool(ok)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        _malloc_tuned = False
    return _malloc_tuned


def default_threads() -> int:
    """Threads for one process when it is alone on the machine."""
    return max(1, len(os.sched_getaffinity(0)))
