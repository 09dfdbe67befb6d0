"""What every benchmark shares: the machine it ran on, result writing, and the data generator.

Results are only comparable on the same machine, so every JSON carries ``machine``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    import psutil

    info = {
        "hostname_kind": platform.machine(),
        "cpu_model": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _gpu(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for module in ("numpy", "torch", "torchvision", "faiss", "ray", "pyarrow"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # a benchmark may not need every package
            pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return "none"


def write_result(name: str, result: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine attached; return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = {**result, "machine": result.get("machine") or machine_info()}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def gaussian_mixture(
    n: int,
    dim: int,
    clusters: int = 1000,
    seed: int = 0,
    spread: float = 0.35,
    chunk: int = 250_000,
    labels: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised vectors around ``clusters`` random centres: closer to real embeddings
    (clustered, anisotropic neighbourhoods) than uniform noise, so IVF+PQ recall means something.
    With ``labels``, also each vector's cluster (metadata correlated with the vectors, as a
    catalogue's category is); the vectors are the same either way.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # each cluster gets its own scale so neighbourhood density varies as in real data
    scales = (spread * rng.uniform(0.5, 1.5, clusters) / np.sqrt(dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    cluster = np.empty(n, dtype=np.int32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        drawn = rng.integers(0, clusters, stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block = centres[drawn] + noise * scales[drawn, None]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
        cluster[start:stop] = drawn
    return (out, cluster) if labels else out


def pareto(points: list[dict], cost: str, value: str) -> list[dict]:
    """The points no other point beats on both ``cost`` (lower better) and ``value`` (higher
    better), cheapest first: a system's best trade-off curve over its knobs."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p[cost], -p[value])):
        if p[value] > best:
            front.append(p)
            best = p[value]
    return front


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and free a matplotlib figure (every benchmark's PNG the same way)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def add_scale_args(
    parser: argparse.ArgumentParser, *, workdir: Path, queries: int, queries_help: str
) -> None:
    """The options of the benchmarks over one synthetic store (peers, filtered search): its
    size, shape and memory budget, the held-out queries and the requests per measurement."""
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100k vectors, fewer requests")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--queries", type=int, default=queries, help=queries_help)
    parser.add_argument("--requests", type=int, default=1000, help="requests per measurement")
    parser.add_argument("--workdir", type=Path, default=workdir)
    parser.add_argument("--memory-budget", default="4G")
