"""Soak: half an hour of mixed load on the app, each process's memory sampled, nothing lost.

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/soak.py --minutes 30

The app of ``benchmarks/histories.py`` (a small indexed store on moto's S3, reached through the
fault proxy with its faults off: this run looks for leaks, not for fault handling) under
``--clients`` seeded clients (``harness.workload``: searches by vector and by id, reads, adds,
deletes, re-adds) for ``--minutes``, with a forced rebuild every ``--rebuild-every-s`` (every
other one with ``retrain``). Every ``--sample-s`` the resident memory (RSS) of each Serve
process (ingress, shard searchers, rebuilder, canary, Serve's proxy and controller) is sampled.
At the end every id any write named is read once after the documented bound, and the history
checker (``harness.history.check``) says what was lost.

Headline keys (issue #23's ``soak.json``): ``minutes``, ``rss_growth_ratio`` (the processes'
summed RSS over the last ``--window-s`` against the same span right after ``--warmup-s``),
``rss_growth_ratio_worst`` (the same for the process that grew most), ``errors`` (5xx, no
answer, or a 4xx other than ``unknown_id`` on a deleted row), ``acked_writes_lost`` (the
checker's ``lost`` and ``resurrected`` anomalies), ``operations``, ``rebuilds``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too

from pipelines.local_ray import use_local_ray_env  # noqa: E402

use_local_ray_env()

from benchmarks import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--ops-per-s", type=float, default=25.0, help="the clients' pace, in all")
    p.add_argument("--rebuild-every-s", type=float, default=180.0)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=300.0)
    p.add_argument("--window-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=30)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vs-soak")
    p.add_argument("--name", default="soak", help="results/<name>.json and .png")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    return p.parse_args(argv)


class RssSampler:
    """The RSS of every Serve process, every ``every_s``, on a thread of its own."""

    def __init__(self, every_s: float, clock) -> None:
        self.every_s = every_s
        self.clock = clock
        self.samples: list[dict] = []  # {"t", "rss": {deployment: bytes}}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict:
        import psutil

        from harness.serve_app import serve_replicas

        rss = {}
        for row in serve_replicas(include_system=True):
            try:
                rss[row["deployment"]] = psutil.Process(row["pid"]).memory_info().rss
            except psutil.Error:  # gone between the listing and the read
                continue
        return {"t": round(self.clock(), 1), "rss": rss}

    def _run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(self.every_s):
                return


def growth(samples: list[dict], warmup_s: float, window_s: float) -> dict:
    """RSS after warm-up vs. at the end: the summed ratio and each process's."""
    end = samples[-1]["t"]
    early = [s for s in samples if warmup_s <= s["t"] < warmup_s + window_s]
    late = [s for s in samples if s["t"] > end - window_s]
    if not early or not late:
        raise ValueError(f"run too short for --warmup-s {warmup_s} and --window-s {window_s}")
    names = sorted(set(early[0]["rss"]) & set(late[-1]["rss"]))

    def mean(rows, name) -> float:
        values = [r["rss"][name] for r in rows if name in r["rss"]]
        return sum(values) / len(values)

    per = {name: mean(late, name) / mean(early, name) for name in names}
    total = sum(mean(late, n) for n in names) / sum(mean(early, n) for n in names)
    return {
        "rss_growth_ratio": round(total, 4),
        "rss_growth_ratio_worst": round(max(per.values()), 4),
        "rss_growth_by_process": {n: round(r, 4) for n, r in per.items()},
        "rss_mib_after_warmup": {n: round(mean(early, n) / 2**20, 1) for n in names},
        "rss_mib_at_end": {n: round(mean(late, n) / 2**20, 1) for n in names},
    }


def errors_of(ops) -> dict[str, int]:
    """Answers that are errors for a client: 5xx, none at all, or a 4xx other than a read of a
    row deleted meanwhile (404 ``unknown_id``)."""
    out: dict[str, int] = {}
    for op in ops:
        if op.kind in ("kill", "recovered") or op.outcome.get("final"):
            continue
        if op.status is None:
            why = f"{op.kind}: no answer ({op.outcome.get('error')})"
        elif op.status >= 500 or (op.status >= 400 and op.outcome.get("error") != "unknown_id"):
            why = f"{op.kind}: {op.status} {op.outcome.get('error')}"
        else:
            continue
        out[why] = out.get(why, 0) + 1
    return out


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    samples = result["rss_samples"]
    names = sorted({n for s in samples for n in s["rss"]})
    for name in names:
        points = [(s["t"] / 60, s["rss"][name] / 2**20) for s in samples if name in s["rss"]]
        ax.plot(*zip(*points, strict=True), label=name, linewidth=1)
    for t in result["rebuild_times_s"]:
        ax.axvline(t / 60, color="#999999", linewidth=0.5, linestyle=":")
    ax.axvspan(result["warmup_s"] / 60, (result["warmup_s"] + result["window_s"]) / 60, alpha=0.1)
    ax.set_xlabel("minutes (dotted: forced rebuilds; shaded: the warm-up reference window)")
    ax.set_ylabel("RSS (MiB)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(
        f"{result['operations']:,} operations, RSS growth {result['rss_growth_ratio']:.3f}x, "
        f"{result['errors']} errors, {result['acked_writes_lost']} acknowledged writes lost",
        fontsize=9,
    )
    common.machine_title(fig, "Soak", result)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        common.replot(args.name, plot)
        return 0
    from harness.faultproxy import FaultRates
    from harness.history import READS, WRITES, check, summary
    from harness.workload import DELTA_POLL_S, s3_app_session

    common.work_in(args.workdir)
    duration = args.minutes * 60
    with s3_app_session(args.workdir) as app:
        work = app.workload(
            args.seed,
            rates=FaultRates(delay=0, reset=0, drop=0, error_500=0, error_503=0),
            clients=args.clients,
            duration_s=duration,
            max_ops=int(args.ops_per_s * duration),
            rebuild_at_s=args.rebuild_every_s / 2,
            rebuild_every_s=args.rebuild_every_s,
        )
        sampler = RssSampler(args.sample_s, work.history.now).start()
        started = time.time()
        history = work.run()
        sampler.stop()
        finals = work.final_reads(quiet_s=6 * DELTA_POLL_S)
    anomalies = check(history, finals)
    ops = history.snapshot()
    load = [o for o in ops if not o.outcome.get("final")]
    errors = errors_of(ops)
    classes = summary(anomalies)
    result = {
        "command": common.command("soak", argv),
        "minutes": round(max((o.invoke for o in load), default=0) / 60, 2),
        **growth(sampler.samples, args.warmup_s, args.window_s),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "acked_writes_lost": classes["lost"] + classes["resurrected"],
        "anomaly_classes": classes,
        "first_anomalies": [str(a) for a in anomalies[:20]],
        "operations": sum(1 for o in load if o.kind in WRITES + READS),
        "counts": history.counts(),
        "final_reads": len(finals),
        "rebuilds": sum(1 for o in ops if o.kind == "rebuild"),
        "rebuild_times_s": [round(o.invoke, 1) for o in ops if o.kind == "rebuild"],
        "started_at": started,
        "warmup_s": args.warmup_s,
        "window_s": args.window_s,
        "rss_samples": sampler.samples,
    }
    history.dump(args.workdir / "soak-history.json")
    common.write_and_plot(args.name, result, plot, headline=True)
    lost = result["acked_writes_lost"] or result["errors"] or result["rss_growth_ratio"] > 1.05
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
