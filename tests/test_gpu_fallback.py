"""A GPU that was granted but cannot be used: the model runs on the CPU and says so once.

Ray schedules a process for a ``GPU`` resource and sets ``CUDA_VISIBLE_DEVICES``; on a node
whose GPU torch cannot use (no driver, a CPU-only torch, the fake GPU of Ray's test
autoscaler, as in ``test_fake_cluster.py``) the embedding actor and the query embedder must
still work. Skipped where CUDA really is there.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from embedding import model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(model, "_warned_no_cuda", False)


def test_cuda_asked_for_without_cuda_falls_back_to_cpu_once(fresh_warning, caplog):
    with caplog.at_level(logging.WARNING, logger="embedding.model"):
        first = model.Embedder(
            model.ModelConfig(name="mobilenet_v2", weights="none", device="cuda")
        )
        second = model.Embedder(
            model.ModelConfig(name="mobilenet_v2", weights="none", device="cuda")
        )
    assert first.device.type == second.device.type == "cpu"
    assert first.half is False  # float16 is for GPUs only
    vectors = first.embed(np.zeros((2, first.image_size, first.image_size, 3), np.uint8))
    assert vectors.shape == (2, first.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1)
    lines = [r.getMessage() for r in caplog.records if "sees no CUDA" in r.getMessage()]
    assert len(lines) == 1 and "embedding on the CPU instead" in lines[0]  # once per process


def test_auto_device_warns_only_when_ray_granted_a_gpu(fresh_warning, caplog, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with caplog.at_level(logging.WARNING, logger="embedding.model"):
        assert model.pick_device("auto").type == "cpu"
    assert "sees no CUDA" not in caplog.text  # a CPU machine asking for "auto": nothing to say
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what Ray sets for a num_gpus=1 actor
    with caplog.at_level(logging.WARNING, logger="embedding.model"):
        assert model.pick_device("auto").type == "cpu"
    assert "CUDA_VISIBLE_DEVICES='0'" in caplog.text
    assert model.pick_device("cpu").type == "cpu"
