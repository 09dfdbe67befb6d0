"""The embedding job's images/s against the bare model's, on real Caltech-101 photos (#2, #17).

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/embed_throughput.py [--quick] [--sweep]

Photos: ``--images`` (default 10,000) spread over every Caltech-101 folder; the collection has
9,144, so past that each further photo is an existing one under another name (a symlink in the
work folder: another URI, so another id, and the same decode work). ``--quick``: 1,000.

Bare model: ``Embedder.embed`` on crops decoded beforehand, in this process, batch after batch:
the most the model can do here. Pipeline: ``pipelines/embed.py``'s ``run_job`` end to end (list,
read, decode, crop, embed, write Parquet) on the same photos, same model, batch size and torch
threads, into a fresh store. Its images/s is the job's own figure: Ray Data execution time,
actor start-up and model load included (Ray itself is started once beforehand: a cluster cost,
not a job cost). The bare model is measured before and after the pipeline and averaged, so load
from other processes on the machine shows up as a spread rather than a skewed ratio.

The job pays a fixed start-up (actor process, torch import, model load: ~4-6 s here) that the
bare model does not, so the end-to-end ratio grows with the number of photos; the JSON keeps the
start-up and the rate after the first batch apart so either can be quoted. Other processes on
a shared box skew single runs, so the headline is the median of paired rounds (bare, job, bare)
and every round records the load average.

Where the time goes: while the job runs, every process of the machine is sampled (``psutil``,
once a second) and its CPU seconds are attributed to a role by its process title (Ray names a
worker after what it runs): the model actors (and, inside them, the model's own forward time),
the read+decode tasks, the write tasks, the driver (Ray Data's executor), Ray's daemons and
idle workers, and other processes on the box. ``--sweep`` adds a sweep over batch size and
actor count (fewer photos per point).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, too

from pipelines.local_ray import use_local_ray_env  # noqa: E402

use_local_ray_env()

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from embedding import Embedder, ModelConfig, decode_image, prepare  # noqa: E402
from embedding.model import default_threads  # noqa: E402
from embedding.preprocess import resize_size_of  # noqa: E402
from harness.samplers import CpuSampler  # noqa: E402
from pipelines.embed import connect_ray, default_actors, run_job  # noqa: E402
from pipelines.embed_config import EmbedJobConfig  # noqa: E402

NAME = "embed_throughput"
CALTECH = common.CALTECH / "101_ObjectCategories"


def caltech_photos(n: int, work: Path | None = None) -> list[Path]:
    """``n`` photos spread evenly over every folder, fixed order. Past the collection's size
    (9,144) the rest are symlinks in ``work/extra`` to the first photos (new names: new ids)."""
    files = sorted(CALTECH.glob("*/*.jpg"))
    if len(files) >= n:
        step = len(files) / n
        return [files[int(i * step)] for i in range(n)]
    if work is None:
        raise SystemExit(f"only {len(files)} photos under {CALTECH}, {n} asked for")
    extra = work / "extra"
    extra.mkdir(parents=True, exist_ok=True)
    links = []
    for i, source in enumerate(files[: n - len(files)]):
        link = extra / f"{i:05d}-{source.parent.name}-{source.name}"
        if not link.exists():
            link.symlink_to(source)
        links.append(link)
    return files + links


# what each process is, by a part of its title (harness.samplers.CpuSampler)
ROLES = (
    ("EmbedBatch", "model actors"),
    ("read_decode_batch", "read+decode tasks"),
    ("write_parts", "write tasks"),
    ("read_block", "read+decode tasks"),
    ("ray::IDLE", "Ray idle workers"),
    ("raylet", "Ray daemons (raylet, GCS, agents)"),
    ("gcs_server", "Ray daemons (raylet, GCS, agents)"),
    ("ray/", "Ray daemons (raylet, GCS, agents)"),
    ("ray::", "Ray other workers"),
)


def breakdown(sampler: CpuSampler, model_seconds: float) -> dict:
    """CPU seconds by role, the model's forward split out of the actors', and shares of
    the machine's capacity (cores x wall seconds)."""
    seconds = dict(sampler.seconds)
    actors = seconds.pop("model actors", 0.0)
    seconds["model forward (inside the actors)"] = min(actors, model_seconds)
    seconds["actor overhead (batching, Arrow, calls)"] = max(0.0, actors - model_seconds)
    capacity = len(os.sched_getaffinity(0)) * sampler.wall_s
    seconds["idle"] = max(0.0, capacity - sampler.machine_busy_s)
    return {
        "wall_seconds": round(sampler.wall_s, 2),
        "capacity_cpu_seconds": round(capacity, 2),
        "cpu_seconds": {k: round(v, 2) for k, v in sorted(seconds.items())},
        "share_of_capacity": {
            k: round(v / capacity, 4) for k, v in sorted(seconds.items()) if capacity
        },
    }


def decode_all(photos: list[Path], image_size: int) -> np.ndarray:
    """The crops the job would make (same decode, draft mode and crop), done up front."""
    resize = resize_size_of(image_size)
    decoded = (decode_image(p.read_bytes(), draft_size=resize) for p in photos)
    return np.stack([prepare(image, image_size, resize) for image in decoded])


def bare_model(embedder: Embedder, crops: np.ndarray, batch_size: int) -> float:
    """Images/s of the model alone: one warm-up batch, then every crop once, batch by batch."""
    embedder.embed(crops[:batch_size])
    started = time.perf_counter()
    for start in range(0, len(crops), batch_size):
        embedder.embed(crops[start : start + batch_size])
    return len(crops) / (time.perf_counter() - started)


def _bare_process(path, model, threads, batch_size, part, parts, barrier, results) -> None:
    """One of ``parts`` model processes: its share of the crops, timed from a common start."""
    crops = np.load(path)[part::parts]
    embedder = Embedder(ModelConfig(name=model, threads=threads))
    embedder.embed(crops[:batch_size])  # warm-up
    barrier.wait()
    started = time.time()
    for start in range(0, len(crops), batch_size):
        embedder.embed(crops[start : start + batch_size])
    results.put((started, time.time(), len(crops)))


def bare_models(path: Path, model: str, processes: int, threads: int, batch_size: int) -> float:
    """Images/s of ``processes`` bare models side by side (the layout of an actor pool)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a forked torch/OpenMP runtime can hang
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    share = (str(path), model, threads, batch_size)
    procs = [
        ctx.Process(target=_bare_process, args=(*share, i, processes, barrier, results))
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    runs = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(n for _, _, n in runs) / (max(e for _, e, _ in runs) - min(s for s, _, _ in runs))


def bare_best(embedder, crops, path, model, actors, threads, batch_size) -> dict:
    """The bare model in one process with all threads, and laid out like the actor pool; the
    job is compared with the faster of the two, so no layout flatters it."""
    out = {f"1x{threads}": bare_model(embedder, crops, batch_size)}
    if actors > 1:
        per = max(1, threads // actors)
        out[f"{actors}x{per}"] = bare_models(path, model, actors, per, batch_size)
    return out


def pipeline(listing: Path, work: Path, batch_size: int, actors: int, threads: int) -> dict:
    """One end-to-end job run into a fresh store; its summary (images/s, start-up...) and where
    the machine's CPU went meanwhile (``cpu``)."""
    store = work / f"store-b{batch_size}-a{actors}-{time.monotonic_ns()}"
    config = EmbedJobConfig(
        input=[str(listing)],
        store=str(store),
        batch_size=batch_size,
        actors=actors,
        threads=max(1, threads // actors),
    )
    with CpuSampler(ROLES, "driver (Ray Data executor)") as sampler:
        summary = run_job(config, log=lambda *_: None)
    shutil.rmtree(store, ignore_errors=True)
    if summary.errors or summary.embedded != summary.inputs:
        raise RuntimeError(f"pipeline run lost images: {summary.line()}")
    return {**summary.to_dict(), "cpu": breakdown(sampler, summary.model_seconds)}


def plot(result: dict, path: Path, before: dict | None = None) -> None:
    """Left: where the machine's CPU went during the job (before and after, when given);
    right: images/s of the job (end to end, steady) against the bare model."""
    plt = common.pyplot()
    runs = [("before", before), ("after", result)] if before else [("this run", result)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    roles = sorted({r for _, run in runs for r in run["cpu"]["share_of_capacity"]})
    roles.sort(key=lambda r: (not r.startswith("model forward"), r == "idle", r))
    bottom = np.zeros(len(runs))
    for i, role in enumerate(roles):
        shares = np.array([run["cpu"]["share_of_capacity"].get(role, 0.0) for _, run in runs])
        left.bar(range(len(runs)), shares, 0.55, bottom=bottom, label=role, color=f"C{i % 10}")
        bottom += shares
    left.set_xticks(
        range(len(runs)),
        [f"{name}\n{run['images']:,} photos, {run['commit']}" for name, run in runs],
        fontsize=8,
    )
    left.set_ylabel("share of the machine's CPU (cores x job seconds)")
    left.set_title(
        f"where the CPU went during the job ({result['machine']['cores']} cores)", fontsize=10
    )
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    names = ["bare model", "job, end to end", "job, steady state"]
    width = 0.8 / len(runs)
    for i, (label, run) in enumerate(runs):
        keys = ("bare_model_images_per_s", "pipeline_images_per_s", "steady_pipeline_images_per_s")
        values = [run[k] for k in keys]
        bars = right.bar(np.arange(3) + i * width, values, width, label=label)
        common.label_bars(right, bars, [f"{v:.0f}" for v in values], fontsize=7, va="baseline")
    right.set_xticks(np.arange(3) + width * (len(runs) - 1) / 2, names, fontsize=8)
    right.set_ylabel("images/s")
    right.set_title(
        f"{result['model'].split('@')[0]}: ratio {result['ratio_to_bare_model']:.2f} end to end, "
        f"{result['steady_ratio_to_bare_model']:.2f} steady (goals 0.85 / 0.9)",
        fontsize=10,
    )
    right.legend(fontsize=8)
    common.save_figure(fig, path, dpi=120)


def load() -> float:
    """1-minute load average: on a shared 2-core box, > ~3 means others were running too."""
    return round(os.getloadavg()[0], 2)


def paired_round(embedder, crops, path, listing, work, batch_size, actors, threads, model):
    """Bare model, job, bare model again: the job against the best bare mean around it."""
    before = bare_best(embedder, crops, path, model, actors, threads, batch_size)
    load_before = load()
    job = pipeline(listing, work, batch_size, actors, threads)
    load_after = load()
    after = bare_best(embedder, crops, path, model, actors, threads, batch_size)
    layouts = {k: (before[k] + after[k]) / 2 for k in before}
    best = max(layouts, key=layouts.get)
    bare = layouts[best]
    return {
        "batch_size": batch_size,
        "actors": actors,
        "threads_per_actor": max(1, threads // actors),
        "bare_model_images_per_s": bare,
        "bare_model_layout": best,  # processes x threads of the faster bare run
        "bare_model_layouts_images_per_s": {k: [before[k], after[k]] for k in before},
        "images_per_s": job["images_per_s"],
        "steady_images_per_s": job["steady_images_per_s"],
        "model_in_job_images_per_s": job["embedded"] / job["model_seconds"],
        "first_batch_seconds": job["first_batch_seconds"],
        "job_seconds": job["seconds"],
        "job_images": job["embedded"],
        "ratio_to_bare_model": job["images_per_s"] / bare,
        "steady_ratio_to_bare_model": job["steady_images_per_s"] / bare,
        "load_1min": [load_before, load_after],
        "cpu": job["cpu"],
    }


def commit() -> str:
    """The checkout's commit (the plot names the runs it compares by it)."""
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 photos")
    ap.add_argument("--images", type=int, help="headline photos (default 10,000; quick 1,000)")
    ap.add_argument("--rounds", type=int, default=1, help="headline rounds, median taken")
    ap.add_argument("--sweep", action="store_true", help="also sweep batch size and actors")
    ap.add_argument("--sweep-images", type=int, default=500, help="photos per sweep point")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--actors", type=int, help="headline actors (default: the job's own)")
    ap.add_argument("--bare-images", type=int, default=1000, help="crops per bare-model run")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--name", default=NAME, help="result name (JSON and PNG)")
    ap.add_argument("--before", type=Path, help="an earlier result JSON to plot beside this one")
    args = ap.parse_args(argv)
    n_images = args.images or (1000 if args.quick else 10_000)

    work = Path(tempfile.mkdtemp(prefix="vs-bench-embed-", dir="/tmp"))
    os.environ["TMPDIR"] = str(work)
    try:
        photos = caltech_photos(n_images, work)
        listing = work / "photos.txt"
        listing.write_text("".join(f"{p}\n" for p in photos))
        sweep_listing = work / "sweep.txt"
        sweep_listing.write_text("".join(f"{p}\n" for p in photos[: args.sweep_images]))

        embedder = Embedder(ModelConfig(name=args.model, threads=args.threads))
        sample = photos[:: max(1, len(photos) // max(args.bare_images, args.sweep_images))]
        started = time.perf_counter()
        crops = decode_all(sample[: max(args.bare_images, args.sweep_images)], embedder.image_size)
        decode_s = time.perf_counter() - started
        print(f"{len(crops)} photos decoded in {decode_s:.1f} s ({len(crops) / decode_s:.0f}/s)")
        bare_crops = crops[: args.bare_images]
        bare_path, sweep_path = work / "bare.npy", work / "sweep.npy"
        np.save(bare_path, bare_crops)
        np.save(sweep_path, crops[: args.sweep_images])
        ray_started = time.perf_counter()
        ray = connect_ray(temp_dir=str(work / "ray"))  # as the CLI does: a local Ray, all cores
        ray_start_s = time.perf_counter() - ray_started
        actors = args.actors or default_actors(ray.cluster_resources(), 0)

        threads, model = args.threads, args.model

        def paired(crops_, path, listing_, batch_size, actors_) -> dict:
            r = paired_round(
                embedder, crops_, path, listing_, work, batch_size, actors_, threads, model
            )
            print(
                f"batch {r['batch_size']}, {r['actors']} actors: bare model "
                f"{r['bare_model_images_per_s']:.1f}/s, job {r['images_per_s']:.1f}/s (steady "
                f"{r['steady_images_per_s']:.1f}/s, start-up {r['first_batch_seconds']:.1f} s): "
                f"ratio {r['ratio_to_bare_model']:.2f} (steady "
                f"{r['steady_ratio_to_bare_model']:.2f}), load {r['load_1min']}",
                flush=True,
            )
            return r

        print(f"\nheadline: {args.rounds} round(s) of bare / job / bare on {len(photos)} photos")
        headline = []
        for _ in range(args.rounds):
            headline.append(paired(bare_crops, bare_path, listing, args.batch_size, actors))
            for role, share in headline[-1]["cpu"]["share_of_capacity"].items():
                print(f"    {share:6.1%}  {role}")
        sweep = []
        if args.sweep:
            print(f"\nsweep on {args.sweep_images} photos")
            sweep_crops = crops[: args.sweep_images]
            for batch_size in (8, 16, 32, 64):
                for sweep_actors in (1, 2):
                    sweep.append(
                        paired(sweep_crops, sweep_path, sweep_listing, batch_size, sweep_actors)
                    )
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ranked = sorted(headline, key=lambda r: r["ratio_to_bare_model"])
    median = ranked[len(ranked) // 2]  # the round with the median ratio: its numbers agree
    result = {
        "ratio_to_bare_model": median["ratio_to_bare_model"],
        "steady_ratio_to_bare_model": median["steady_ratio_to_bare_model"],
        "images": len(photos),
        "startup_s": median["first_batch_seconds"],
        "pipeline_images_per_s": median["images_per_s"],
        "bare_model_images_per_s": median["bare_model_images_per_s"],
        "steady_pipeline_images_per_s": median["steady_images_per_s"],
        "start_up_seconds": median["first_batch_seconds"],
        "job_seconds": median["job_seconds"],
        "cpu": median["cpu"],
        "goal_ratio": 0.85,
        "goal_steady_ratio": 0.9,
        "machine": common.machine_info(),
        "commit": commit(),
        "model": embedder.model_tag,
        "photos": "all 9,144 Caltech-101 photos (every folder), then symlinks to the first "
        "ones under new names"
        if len(photos) > 9144
        else f"{len(photos)} Caltech-101 photos spread over every folder",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "actors": actors,
        "threads_per_actor": max(1, args.threads // actors),
        "bare_images": len(bare_crops),
        "rounds": headline,
        "ray_start_seconds": ray_start_s,
        "decode_images_per_s_one_process": len(crops) / decode_s,
        "sweep_images": args.sweep_images if sweep else 0,
        "sweep": sweep,
        "quick": args.quick,
        "command": common.command("embed_throughput", argv),
        "bare_model_layout": median["bare_model_layout"],
        "definitions": {
            "ratio_to_bare_model": "job images/s end to end (read, decode, embed, write; actor "
            "start-up and model load included; Ray start excluded) / bare model images/s",
            "steady_ratio_to_bare_model": "job images/s after the model's first batch (images "
            "after it / seconds from its first to its last batch) / bare model images/s",
            "startup_s": "job start to the model's first finished batch",
            "bare_model_images_per_s": "Embedder.embed on pre-decoded crops, same batch size "
            "and total threads, mean of a run just before and just after the job; the faster "
            "of two layouts: one process with all threads, and the actor pool's layout "
            "(actors processes x threads/actors), run side by side",
            "cpu": "CPU seconds of every process during the job, by role (process title, "
            "sampled every second); 'model forward' is the actors' time inside Embedder.embed; "
            "shares are of cores x job seconds",
            "load_1min": "1-minute load average before and after the job: above ~3 other "
            "processes shared the 2 cores and the round is noisy",
        },
    }
    before = json.loads(args.before.read_text()) if args.before else None
    common.write_and_plot(
        args.name, result, lambda written, png: plot(written, png, before), headline=True
    )
    return result


if __name__ == "__main__":
    main()
