"""Where pretrained weights come from, without surprises: a local file, or a library's own cache.

Every loader (``embedding.backbones`` and the timm / open_clip / ONNX loaders beside it) asks
here first. A hub download is tried only where the hub answers (``hub_reachable``): on a machine
without internet the libraries retry for about a minute before failing (timm: 47 s measured),
so a missing file is said at once, naming the file and the folder to put it in.
``weights="none"`` (random initialisation) is only ever taken when asked for, for tests.
"""

from __future__ import annotations

import hashlib
import os
import socket

HF_HOST = "huggingface.co"
# the file names a Hugging Face repository of timm or open_clip weights holds, preferred first
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightsUnavailable(RuntimeError):
    """The requested pretrained weights are not on this machine and cannot be fetched."""


def file_tag(path: str) -> str:
    """``file:<name>:<sha256 prefix>``: names the weights by content, not by where they lie."""
    if not os.path.isfile(path):
        raise WeightsUnavailable(f"weights file {path} does not exist")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"file:{os.path.basename(path)}:{digest.hexdigest()[:12]}"


def hub_reachable(host: str = HF_HOST, timeout_s: float = 3.0) -> bool:
    """Whether a download could work: not told offline (``HF_HUB_OFFLINE``), and ``host``
    answers a TCP connect on 443 within ``timeout_s``."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def hf_cached(repo_id: str, filenames: tuple[str, ...], cache_dir: str | None = None) -> str | None:
    """The path of the first of ``filenames`` in the Hugging Face cache for ``repo_id``, or None
    (no network: ``huggingface_hub.try_to_load_from_cache``)."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def missing(what: str, filename: str, where: str, instead: str) -> WeightsUnavailable:
    """The error for weights that are neither cached nor downloadable from here."""
    return WeightsUnavailable(
        f"{what}: {filename} is not in {where} and the hub cannot be reached from this machine "
        f"(HF_HUB_OFFLINE, or no route to {HF_HOST}). Put the file there, or {instead}"
    )
