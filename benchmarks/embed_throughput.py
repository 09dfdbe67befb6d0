"""The embedding job's images/s against the bare model's, on real Caltech-101 photos (issue #2).

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/embed_throughput.py [--quick]

Bare model: ``Embedder.embed`` on crops decoded beforehand, in this process, batch after batch:
the most the model can do here. Pipeline: ``pipelines/embed.py``'s ``run_job`` end to end (list,
read, decode, crop, embed, write Parquet) on the same photos, same model, batch size and torch
threads, into a fresh store. Its images/s is the job's own figure: Ray Data execution time,
actor start-up and model load included (Ray itself is started once beforehand: a cluster cost,
not a job cost). The bare model is measured before and after the pipeline and averaged, so load
from other processes on the machine shows up as a spread rather than a skewed ratio.

The job pays a fixed start-up (actor process, torch import, model load: ~5-7 s here) that the
bare model does not, so the end-to-end ratio grows with the number of photos; the JSON keeps the
start-up and the rate after the first batch apart so either can be quoted.

A sweep over batch size and actor count (fewer photos per point) feeds the plot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

from benchmarks.common import RESULTS_DIR, machine_info, write_result  # noqa: E402
from embedding import Embedder, ModelConfig, decode_image, prepare  # noqa: E402
from embedding.model import default_threads  # noqa: E402
from pipelines.embed import connect_ray, run_job  # noqa: E402
from pipelines.embed_config import EmbedJobConfig  # noqa: E402

NAME = "embed_throughput"
DATA = Path(os.environ.get("VISUAL_SEARCH_DATA", ROOT.parent / "shared" / "data"))
CALTECH = DATA / "images" / "caltech101" / "101_ObjectCategories"


def caltech_photos(n: int) -> list[Path]:
    """``n`` photos spread evenly over every class (BACKGROUND_Google left out), fixed order."""
    files = sorted(p for p in CALTECH.glob("*/*.jpg") if p.parent.name != "BACKGROUND_Google")
    if len(files) < n:
        raise SystemExit(f"only {len(files)} photos under {CALTECH}, {n} asked for")
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def decode_all(photos: list[Path], image_size: int) -> np.ndarray:
    """The crops the job would make (same decode, draft mode and crop), done up front."""
    resize = round(image_size * 256 / 224)
    return np.stack(
        [
            prepare(decode_image(p.read_bytes(), draft_size=resize), image_size, resize)
            for p in photos
        ]
    )


def bare_model(embedder: Embedder, crops: np.ndarray, batch_size: int) -> float:
    """Images/s of the model alone: one warm-up batch, then every crop once, batch by batch."""
    embedder.embed(crops[:batch_size])
    started = time.perf_counter()
    for start in range(0, len(crops), batch_size):
        embedder.embed(crops[start : start + batch_size])
    return len(crops) / (time.perf_counter() - started)


def pipeline(listing: Path, work: Path, batch_size: int, actors: int, threads: int) -> dict:
    """One end-to-end job run into a fresh store; its summary (images/s, start-up...)."""
    store = work / f"store-b{batch_size}-a{actors}-{time.monotonic_ns()}"
    config = EmbedJobConfig(
        input=[str(listing)],
        store=str(store),
        batch_size=batch_size,
        actors=actors,
        threads=max(1, threads // actors),
    )
    summary = run_job(config, log=lambda *_: None)
    shutil.rmtree(store, ignore_errors=True)
    if summary.errors or summary.embedded != summary.inputs:
        raise RuntimeError(f"pipeline run lost images: {summary.line()}")
    return summary.to_dict()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["sweep"]
    batches = sorted({p["batch_size"] for p in sweep})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bare = [
        next(p["bare_model_images_per_s"] for p in sweep if p["batch_size"] == b) for b in batches
    ]
    left.plot(batches, bare, "k--o", label="bare model (forward only)")
    for actors in sorted({p["actors"] for p in sweep}):
        points = [p for p in sweep if p["actors"] == actors]
        xs = [p["batch_size"] for p in points]
        left.plot(xs, [p["images_per_s"] for p in points], "-o", label=f"job, {actors} actor(s)")
        left.plot(
            xs,
            [p["steady_images_per_s"] for p in points],
            ":",
            marker="x",
            label=f"job after start-up, {actors} actor(s)",
        )
        right.plot(xs, [p["ratio_to_bare_model"] for p in points], "-o", label=f"{actors} actor(s)")
    right.axhline(0.85, color="grey", lw=0.8, ls="--", label="goal 0.85")
    head = result
    left.set_title(
        f"{head['model']} on {head['machine']['cores']} CPU cores, "
        f"{result['sweep_images']} photos per point"
    )
    left.set_xlabel("batch size")
    left.set_ylabel("images/s")
    left.set_xscale("log", base=2)
    left.legend(fontsize=8)
    right.set_title(
        f"job / bare model; headline {head['images']} photos: {head['ratio_to_bare_model']:.2f}"
    )
    right.set_xlabel("batch size")
    right.set_ylabel("ratio")
    right.set_xscale("log", base=2)
    right.set_ylim(0, 1.1)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer photos and sweep points")
    ap.add_argument("--images", type=int, help="headline photos (default 3,000; quick 1,000)")
    ap.add_argument("--sweep-images", type=int, help="photos per sweep point (default 300)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--model", default="efficientnet_lite0")
    args = ap.parse_args(argv)
    n_images = args.images or (1000 if args.quick else 3000)
    sweep_images = args.sweep_images or (150 if args.quick else 300)
    batches = [16, 32] if args.quick else [8, 16, 32, 64]
    actor_counts = [1, 2]

    work = Path(tempfile.mkdtemp(prefix="vs-bench-embed-", dir="/tmp"))
    os.environ["TMPDIR"] = str(work)
    try:
        photos = caltech_photos(n_images)
        listing = work / "photos.txt"
        listing.write_text("".join(f"{p}\n" for p in photos))
        sweep_listing = work / "sweep.txt"
        sweep_listing.write_text("".join(f"{p}\n" for p in photos[:sweep_images]))

        embedder = Embedder(ModelConfig(name=args.model, threads=args.threads))
        started = time.perf_counter()
        crops = decode_all(photos, embedder.image_size)
        decode_s = time.perf_counter() - started
        print(f"{len(photos)} photos decoded in {decode_s:.1f} s ({len(photos) / decode_s:.0f}/s)")

        bare_before = bare_model(embedder, crops, args.batch_size)
        print(f"bare model: {bare_before:.1f} images/s (batch {args.batch_size})")
        ray_started = time.perf_counter()
        connect_ray(temp_dir=str(work / "ray"))  # what the CLI does: a local Ray, all cores
        ray_start_s = time.perf_counter() - ray_started
        job = pipeline(listing, work, args.batch_size, 1, args.threads)
        print(
            f"job: {job['images_per_s']:.1f} images/s end to end, "
            f"{job['steady_images_per_s']:.1f} after the first batch "
            f"({job['first_batch_seconds']:.1f} s start-up)"
        )
        bare_after = bare_model(embedder, crops, args.batch_size)
        print(f"bare model again: {bare_after:.1f} images/s")
        bare = (bare_before + bare_after) / 2

        sweep = []
        print(f"\nsweep on {sweep_images} photos")
        print(f"{'batch':>5} {'actors':>6} {'bare/s':>8} {'job/s':>7} {'steady/s':>8} {'ratio':>6}")
        for batch_size in batches:
            bare_b = bare_model(embedder, crops[:sweep_images], batch_size)
            for actors in actor_counts:
                run = pipeline(sweep_listing, work, batch_size, actors, args.threads)
                point = {
                    "batch_size": batch_size,
                    "actors": actors,
                    "threads_per_actor": max(1, args.threads // actors),
                    "bare_model_images_per_s": bare_b,
                    "images_per_s": run["images_per_s"],
                    "steady_images_per_s": run["steady_images_per_s"],
                    "first_batch_seconds": run["first_batch_seconds"],
                    "ratio_to_bare_model": run["images_per_s"] / bare_b,
                    "steady_ratio_to_bare_model": run["steady_images_per_s"] / bare_b,
                }
                sweep.append(point)
                print(
                    f"{batch_size:>5} {actors:>6} {bare_b:>8.1f} {run['images_per_s']:>7.1f} "
                    f"{run['steady_images_per_s']:>8.1f} {point['ratio_to_bare_model']:>6.2f}"
                )
        import ray

        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "pipeline_images_per_s": job["images_per_s"],
        "bare_model_images_per_s": bare,
        "ratio_to_bare_model": job["images_per_s"] / bare,
        "steady_pipeline_images_per_s": job["steady_images_per_s"],
        "steady_ratio_to_bare_model": job["steady_images_per_s"] / bare,
        "goal_ratio": 0.85,
        "machine": machine_info(),
        "model": embedder.model_tag,
        "images": len(photos),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "actors": 1,
        "bare_model_runs_images_per_s": [bare_before, bare_after],
        "job": {
            k: job[k] for k in ("embedded", "errors", "parts", "seconds", "first_batch_seconds")
        },
        "ray_start_seconds": ray_start_s,
        "decode_images_per_s_one_process": len(photos) / decode_s,
        "sweep_images": sweep_images,
        "sweep": sweep,
        "quick": args.quick,
        "command": "flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/embed_throughput.py"
        + (" --quick" if args.quick else ""),
        "definitions": {
            "pipeline_images_per_s": "images / job execution seconds (read, decode, embed, "
            "write; actor start-up and model load included; Ray start excluded)",
            "steady_pipeline_images_per_s": "images after the first written batch / seconds "
            "after it (start-up excluded)",
            "bare_model_images_per_s": "Embedder.embed on pre-decoded crops, same batch size "
            "and threads, mean of a run before and a run after the job",
        },
    }
    path = write_result(NAME, result)
    plot(result, RESULTS_DIR / f"{NAME}.png")
    print(
        f"\njob {result['pipeline_images_per_s']:.1f} images/s vs bare model "
        f"{bare:.1f} images/s: ratio {result['ratio_to_bare_model']:.2f} "
        f"(after start-up {result['steady_ratio_to_bare_model']:.2f}); goal 0.85\n"
        f"wrote {path} and {NAME}.png"
    )
    return result


if __name__ == "__main__":
    main()
