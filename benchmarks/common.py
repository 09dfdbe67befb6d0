"""What every benchmark shares: where its data is, its common options, the machine it ran on,
and how it writes its results (``results/<name>.json`` and a PNG).

Results are only comparable on the same machine, so every JSON carries ``machine``. Generated
data, stores, servers and load loops are the harness's (``harness/``), shared with the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# where results go: $VISUAL_SEARCH_BENCH_RESULTS for smoke runs that must not replace the real ones
RESULTS_DIR = Path(os.environ.get("VISUAL_SEARCH_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
DATA = Path(os.environ.get("VISUAL_SEARCH_DATA", ROOT.parent / "shared" / "data"))
CALTECH = DATA / "images" / "caltech101"


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


def pareto(points: list[dict], cost: str, value: str) -> list[dict]:
    """The points no other point beats on both ``cost`` (lower better) and ``value`` (higher
    better), cheapest first: a system's best trade-off curve over its knobs."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p[cost], -p[value])):
        if p[value] > best:
            front.append(p)
            best = p[value]
    return front


def pyplot():
    """matplotlib's pyplot on the Agg backend: the benchmarks draw PNGs, never on a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def work_in(workdir: Path) -> Path:
    """Make ``workdir`` and send temporary files there too (Ray's spills, Arrow, FAISS)."""
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TMPDIR", str(workdir))
    return workdir


def machine_title(fig, what: str, result: dict) -> None:
    """The figure's title: what it shows, on which machine."""
    m = result["machine"]
    fig.suptitle(f"{what}, {m['cores']} cores, GPU {m['gpu']}", fontsize=10)


def label_bars(ax, bars, texts: list[str], fontsize: int = 8, va: str = "bottom") -> None:
    """Each text centred on its bar's top."""
    for bar, text in zip(bars, texts, strict=True):
        at = (bar.get_x() + bar.get_width() / 2, bar.get_height())
        ax.annotate(text, at, ha="center", va=va, fontsize=fontsize)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and free a matplotlib figure (every benchmark's PNG the same way)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def write_and_plot(name: str, result: dict, plot, headline: bool = False) -> Path:
    """``results/<name>.json`` (machine attached), then ``plot(result as written, png path)``;
    with ``headline``, the result's scalar figures are printed too."""
    path = write_result(name, result)
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    if headline:
        print_headline(result)
    return path


def replot(name: str, plot) -> None:
    """Redraw ``results/<name>.png`` from its JSON (the benchmarks' ``--plot-only``)."""
    path = RESULTS_DIR / f"{name}.json"
    plot(json.loads(path.read_text()), path.with_suffix(".png"))


def parse_or_replot(parser, argv: list[str] | None, name: str, plot):
    """The benchmark's arguments, with ``--plot-only`` (added here) and ``--workdir`` (the
    parser's); None when only the plot was redrawn (``replot``), else after ``work_in``."""
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        replot(name, plot)
        return None
    work_in(args.workdir)
    return args


def print_headline(result: dict) -> None:
    """A result's scalar figures, one a line (each JSON puts its headline keys first)."""
    for key, value in result.items():
        if key != "command" and (value is None or isinstance(value, int | float | str)):
            print(f"  {key:36} {value}")


def command(script: str, argv: list[str] | None) -> str:
    """How a run was started, for its JSON: the README's command line with its arguments."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["flock /tmp/vs-heavy.lock .venv/bin/python", f"benchmarks/{script}.py", *args])


def add_scale_args(
    parser: argparse.ArgumentParser,
    *,
    workdir: Path,
    queries: int | None = 1000,
    queries_help: str = "held-out queries",
    requests: int | None = 1000,
    requests_help: str = "requests per measurement",
    quick: str | None = "100k vectors, fewer requests",
    shards: int | list[int] = 4,
) -> None:
    """The options of the benchmarks over one synthetic store (its size, shape, shards and
    memory budget, where it is cached), the held-out queries and the requests per measurement;
    ``None`` leaves an option out, a list of shards makes ``--shards`` take several."""
    parser.add_argument("--n", type=int, default=1_000_000)
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--dim", type=int, default=256)
    many = {"nargs": "+"} if isinstance(shards, list) else {}
    parser.add_argument("--shards", type=int, default=shards, **many)
    if queries is not None:
        parser.add_argument("--queries", type=int, default=queries, help=queries_help)
    if requests is not None:
        parser.add_argument("--requests", type=int, default=requests, help=requests_help)
    parser.add_argument("--workdir", type=Path, default=workdir)
    parser.add_argument("--memory-budget", default="4G")
