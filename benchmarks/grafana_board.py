"""The app's Grafana board drawn from real scraped numbers: ``docs/grafana-board.png``.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/grafana_board.py   # run, scrape, draw
    .venv/bin/python benchmarks/grafana_board.py --plot-only                # redraw the scrapes

No Grafana (nor Prometheus) runs here, so the picture is drawn by this script, not by Grafana:
each panel of ``deploy/grafana/visual-search.json`` at its place on the board's grid, each of its
PromQL expressions evaluated over the scrapes by ``harness.promql`` (the subset the board uses;
rates without Prometheus' extrapolation), drawn with matplotlib in Grafana's dark colours.

The run: a ``ray start --head`` exporting metrics every second (``harness.ray_head``), the
embed job of ``--photos`` Caltech-101 photos and the index build submitted to it and the app
deployed from ``serve/serve_config.yaml`` (``harness.ops_app``); then ``--traffic-s`` seconds
of vector searches at about ``--qps``, with an image upload and a bad request (422) now and
then, ``POST /images`` writes from a third of the way in (the delta), and ``POST
/admin/rebuild`` at two thirds (a rebuild per shard, the swap, GC). Ray's Prometheus export is
scraped every ``--scrape-s`` from the embed job on; the visual_search lines of every scrape are
kept in ``benchmarks/results/grafana_board_scrapes.jsonl.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness import embed_samples as samples  # noqa: E402
from harness.grafana_board import Scraper, load_board, panel_series, panels  # noqa: E402
from harness.ops_app import deploy, embed_and_build  # noqa: E402
from harness.polling import wait_for  # noqa: E402
from harness.promql import parse_scrape  # noqa: E402
from harness.ray_head import RayHead  # noqa: E402

SCRAPES = common.RESULTS_DIR / "grafana_board_scrapes.jsonl.gz"
PICTURE = common.ROOT / "docs" / "grafana-board.png"
KEY = "grafana-board-key"
BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"


def drive(app, photos: list[Path], seconds: float, qps: float) -> None:
    """Searches (vectors, an image now and then, a bad one), writes, then a rebuild."""
    rng = np.random.default_rng(0)
    keyed = {"x-api-key": KEY}
    start, i, rebuilt = time.monotonic(), 0, False
    while (elapsed := time.monotonic() - start) < seconds:
        t = time.monotonic()
        if i % 10 == 9:
            app.client.post("/search", json={"vector": [1.0, 2.0]})  # a 422, on purpose
        elif i % 8 == 0:
            photo = photos[i % len(photos)]
            app.client.post("/search", files={"file": (photo.name, photo.read_bytes())})
        else:
            app.client.post("/search", json={"vector": rng.standard_normal(1280).tolist()})
        if elapsed > seconds / 3 and i % 4 == 0:
            vector = rng.standard_normal(1280).tolist()
            app.client.post("/images", json={"vector": vector, "id": f"w{i}"}, headers=keyed)
        if elapsed > 2 * seconds / 3 and not rebuilt:
            rebuilt = app.client.post("/admin/rebuild", headers=keyed).status_code == 202
        i += 1
        time.sleep(max(0.0, 1 / qps - (time.monotonic() - t)))  # pacing the load


def run(args) -> list[tuple[float, str]]:
    with tempfile.TemporaryDirectory(prefix="vs-board-", dir="/tmp") as work:
        work = Path(work)
        head = RayHead(work / "ray", env_extra={"RAY_metrics_report_interval_ms": "1000"}).start()
        try:
            scraper = Scraper(head.metrics_url, args.scrape_s)
            scraper.start()
            files = samples.caltech_subset(common.CALTECH, args.photos)
            photos = samples.link_images(files, work / "photos")
            embed_and_build(head, work / "photos", work / "store", args.shards)
            app = deploy(head, work / "store", work, reload_interval_s=1, api_key=KEY,
                         rebuild_gc_grace_s=0, canary_fraction=0.2)  # fmt: skip
            try:
                drive(app, photos, args.traffic_s, args.qps)
                wait_for(lambda: "gc_removed" in scraper.last(), 180, "GC after the rebuild")
            finally:
                app.client.close()
            return scraper.stop()
        finally:
            head.stop()


def unit_of(unit: str, values: list[float]) -> tuple[float, str]:
    """A divisor and a label for Grafana's unit names."""
    top = max((abs(v) for v in values), default=0)
    if unit == "bytes":
        return (2**20, "MiB") if top < 2**30 else (2**30, "GiB")
    return {
        "reqps": (1, "req/s"), "ops": (1, "/s"), "ms": (1, "ms"), "s": (1, "s"),
        "percentunit": (0.01, "%"),
    }.get(unit, (1, ""))  # fmt: skip


def draw(scrapes: list[tuple[float, str]], path: Path, range_s: float) -> None:
    plt = common.pyplot()
    parsed = [parse_scrape(text, t) for t, text in scrapes if text]  # from the first series on
    t0, t1 = parsed[0].t, parsed[-1].t
    board = panels(load_board())
    height = max(p.grid["y"] + p.grid["h"] for p in board)
    fig = plt.figure(figsize=(18, height * 0.34), facecolor=BG)

    def top(units: float) -> float:  # figure y of a grid line, a margin left for the note
        return 1 - 0.985 * units / height

    for row in dict.fromkeys(p.row for p in board):
        y = min(p.grid["y"] for p in board if p.row == row) - 1  # the row's own line
        fig.text(0.012, top(y + 0.75), row, color=TEXT, fontsize=12, weight="bold")
    for panel in board:
        g = panel.grid
        box = [g["x"] / 24 + 0.035, top(g["y"] + g["h"] - 0.5), g["w"] / 24 - 0.045, 0]
        box[3] = top(g["y"] + 0.9) - box[1]
        ax = fig.add_axes(box)
        ax.set_facecolor(PANEL)
        ax.set_title(panel.title, color=TEXT, fontsize=9, loc="left")
        lines = panel_series(panel, parsed, range_s)
        values = [v for pts in lines.values() for _, v in pts]
        div, label = unit_of(panel.unit, values)
        for name, pts in sorted(lines.items()):
            ts = [(t - t0) / 60 for t, _ in pts]
            ax.plot(ts, [v / div for _, v in pts], lw=1.4, label=name[:40])
        if lines:
            ax.legend(fontsize=6.5, loc="upper left", facecolor=PANEL, labelcolor=TEXT,
                      edgecolor=GRID, ncol=2 if len(lines) > 4 else 1)  # fmt: skip
            if min(values) >= 0 and panel.unit != "percentunit":
                ax.set_ylim(bottom=0)
        else:
            ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", transform=ax.transAxes)
        ax.set_xlim(0, (t1 - t0) / 60)
        ax.set_ylabel(label, color=TEXT, fontsize=7)
        ax.tick_params(colors=TEXT, labelsize=7)
        ax.grid(color=GRID, lw=0.5)
        for spine in ax.spines.values():
            spine.set_color(GRID)
    fig.text(0.012, 0.004, "x: minutes since the first visual_search series; drawn by "
             f"benchmarks/grafana_board.py from {len(parsed)} real scrapes of Ray's Prometheus "
             f"export (rates over {range_s:g} s), not a Grafana screenshot: no Grafana runs here",
             color=TEXT, fontsize=8)  # fmt: skip
    fig.savefig(path, dpi=80, facecolor=BG)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--traffic-s", type=float, default=150)
    parser.add_argument("--qps", type=float, default=8)
    parser.add_argument("--scrape-s", type=float, default=2)
    parser.add_argument("--rate-s", type=float, default=20, help="$__rate_interval, seconds")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.plot_only:
        scrapes = run(args)
        with gzip.open(SCRAPES, "wt") as out:
            out.writelines(json.dumps({"t": t, "text": text}) + "\n" for t, text in scrapes)
    with gzip.open(SCRAPES, "rt") as lines:
        scrapes = [(r["t"], r["text"]) for r in map(json.loads, lines)]
    draw(scrapes, PICTURE, args.rate_s)
    print(f"wrote {PICTURE} from {len(scrapes)} scrapes ({SCRAPES})")


if __name__ == "__main__":
    main()
