"""The app's Grafana board (``deploy/grafana/visual-search.json``) as data, and the app's series.

``app_series`` is every series the app defines, from the code's own lists (``serve.metrics.SERIES``
for the Serve app, ``pipelines.job_metrics.SERIES`` for the embed job), under the names Ray's
Prometheus export gives them (``ray_`` prefix; ``_total`` on counters; ``_bucket``, ``_sum`` and
``_count`` of histograms). ``board_series`` is every series the board's expressions read
(``harness.promql``). ``tests/test_cluster_ops.py`` holds the two against each other and against
a scrape of a running app; ``benchmarks/grafana_board.py`` evaluates each panel over a sequence
of scrapes to draw the board.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness.promql import Scrape, evaluate, metric_names, parse
from pipelines import job_metrics
from serve import metrics as serve_metrics

ROOT = Path(__file__).resolve().parents[1]
BOARD = ROOT / "deploy" / "grafana" / "visual-search.json"
EXPORT_PREFIX = "ray_"  # what Ray's metrics agent puts before every application metric
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}


@dataclass
class Panel:
    row: str
    title: str
    unit: str
    grid: dict[str, int]  # Grafana's gridPos: x, y, w, h on a 24-wide grid
    targets: list[tuple[str, str]]  # (PromQL, legend format)


def load_board(path: Path = BOARD) -> dict:
    return json.loads(path.read_text())


def panels(board: dict) -> list[Panel]:
    """The board's graph panels in order, each with the title of the row above it."""
    found, row = [], ""
    for panel in board["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        targets = [(t["expr"], t.get("legendFormat", "")) for t in panel.get("targets", [])]
        unit = panel.get("yaxes", [{}])[0].get("format", "short")
        found.append(Panel(row, panel["title"], unit, panel["gridPos"], targets))
    return found


def board_series(board: dict) -> set[str]:
    """Every metric name the board's expressions read."""
    exprs = [expr for panel in panels(board) for expr, _ in panel.targets]
    return set().union(*(metric_names(parse(expr)) for expr in exprs))


def app_series() -> dict[str, set[str]]:
    """Each series the app defines (``visual_search_<name>``) -> the names Ray exports it as."""
    series = {}
    for module in (serve_metrics, job_metrics):
        for name, kind in module.SERIES.items():
            base = EXPORT_PREFIX + module.PREFIX + name
            series[module.PREFIX + name] = {base + suffix for suffix in SUFFIXES[kind]}
    return series


def legend(form: str, labels: frozenset) -> str:
    have = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: have.get(m.group(1), ""), form) or "value"


def panel_series(panel: Panel, scrapes: list[Scrape], range_s: float) -> dict[str, list]:
    """Each series a panel shows over ``scrapes``: legend -> [(t, value)], NaNs left out."""
    lines: dict[str, list] = {}
    for expr, form in panel.targets:
        node = parse(expr, range_s)
        for i, scrape in enumerate(scrapes):
            value = evaluate(node, scrapes, i)
            vector = value if isinstance(value, dict) else {frozenset(): value}
            for labels, v in vector.items():
                if not math.isnan(v):
                    lines.setdefault(legend(form, labels), []).append((scrape.t, v))
    return lines


class Scraper(threading.Thread):
    """Scrapes ``url`` (Ray's Prometheus export) every ``every_s`` and keeps each scrape's lines
    that start with ``prefix``, with its time: what the board is drawn from."""

    def __init__(self, url: str, every_s: float = 2.0, prefix: str = "ray_visual_search_"):
        super().__init__(daemon=True, name="scraper")
        self.url, self.every_s, self.prefix = url, every_s, prefix
        self.scrapes: list[tuple[float, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.time()
            try:
                text = httpx.get(self.url, timeout=10).text
            except httpx.HTTPError:
                text = None
            if text is not None:
                kept = [line for line in text.splitlines() if line.startswith(self.prefix)]
                self.scrapes.append((t, "\n".join(kept)))
            self._halt.wait(max(0.0, self.every_s - (time.time() - t)))  # pacing

    def last(self) -> str:
        return self.scrapes[-1][1] if self.scrapes else ""

    def stop(self) -> list[tuple[float, str]]:
        self._halt.set()
        self.join()
        return self.scrapes
