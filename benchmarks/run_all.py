"""Run every scaling benchmark at one size, each under the shared heavy-work lock.

    .venv/bin/python benchmarks/run_all.py                 # full: 1M (index build also 100k, 4M)
    .venv/bin/python benchmarks/run_all.py --quick         # a few-minute pass at 100k
    .venv/bin/python benchmarks/run_all.py --size 4000000 --only index_build
    .venv/bin/python benchmarks/run_all.py --list          # print the commands, run nothing

Each benchmark runs as its own process (Ray and Serve start and stop cleanly per benchmark), wrapped
in ``flock /tmp/vs-heavy.lock`` unless ``--no-lock``, so other heavy work on a shared box waits
between benchmarks rather than for the whole suite; long ones are split into several locked steps.
Every step writes ``benchmarks/results/<name>.json`` + ``.png``; the table comes last
(``benchmarks/report.py``). ``--quick`` writes ``*_quick`` result names where the benchmark has
them, and leaves out ``embed_throughput`` (its ``--quick`` overwrites the full result).
LanceDB comes from the benchmark extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = "/tmp/vs-heavy.lock"


def steps(size: int, quick: bool, build_sizes=()) -> list[tuple[str, list[str]]]:
    """(benchmark, arguments) in the order they run; each item is one locked process."""
    if quick:
        return [
            ("index_build", ["--quick", "--shards", "1,4"]),
            ("query_scaling", ["--quick"]),
            ("peers", ["--quick", "--name", "peers_quick"]),
            ("control_plane", ["--quick"]),
            ("filtered_search", ["--quick"]),
            ("scale", ["--quick"]),
        ]
    n = ["--n", str(size)]
    # above 1M only 8 shards: one 4M shard would hold the 2 cores for far too long here
    builds = [
        ("index_build", ["--sizes", str(v), *(["--shards", "8"] if v > 1_000_000 else [])])
        for v in sorted({size, *build_sizes})
    ]
    # split by shard count so that no single locked run holds the 2 cores for long
    return [
        ("embed_throughput", []),
        *builds,
        ("query_scaling", [*n, "--shards", "1"]),
        ("query_scaling", [*n, "--shards", "2"]),
        ("peers", [*n, "--phase", "build"]),
        ("peers", n),
        ("filtered_search", n),
        ("query_scaling", [*n, "--shards", "4"]),
        ("query_scaling", [*n, "--shards", "8"]),
        ("query_scaling", [*n, "--shards", "16"]),
        ("control_plane", []),
        ("scale", []),  # 10M vectors: ~40 minutes here
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1_000_000, help="vectors (N)")
    p.add_argument("--quick", action="store_true", help="100k vectors, fewer requests")
    p.add_argument(
        "--build-sizes",
        type=int,
        nargs="*",
        default=[100_000, 4_000_000],
        help="more N for the index build sweep (besides --size)",
    )
    p.add_argument("--only", nargs="+", help="benchmark names to run (default: all)")
    p.add_argument("--no-lock", action="store_true", help=f"do not wrap steps in flock {LOCK}")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    plan = steps(args.size, args.quick, args.build_sizes)
    plan = [(b, a) for b, a in plan if not args.only or b in args.only]
    python = sys.executable
    failed = []
    for bench, extra in plan:
        cmd = [python, str(ROOT / "benchmarks" / f"{bench}.py"), *extra]
        if not args.no_lock:
            cmd = ["flock", LOCK, *cmd]
        print(f"\n=== {shlex.join(cmd)}", flush=True)
        if args.list:
            continue
        t = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"=== {bench}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            failed.append(bench)
    if not args.list:
        subprocess.run([python, str(ROOT / "benchmarks" / "report.py")], cwd=ROOT)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
