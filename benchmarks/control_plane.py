"""Control plane cost against the number of rows: does the store's bookkeeping stay small?

    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/control_plane.py            # 1e4..1e6
    flock /tmp/vs-heavy.lock .venv/bin/python benchmarks/control_plane.py --quick    # 1e4, 1e5

For each size N (``--sizes``) a fresh local store of ``--shards`` shards and ``--dim``-d
Gaussian-mixture rows is written the way the system writes it: N rows in *batch-sized* parts
(``--batch-part-rows`` rows per shard per part, what an embedding job with 2,048-row write
batches used to leave) plus ``--api-writes`` *API-sized* parts (one row each, as ``POST
/images`` writes) and ``--deletes`` one-id tombstone parts. Then:

- **before**: the store as written, with a first version built over the batch parts only (so
  the API parts and tombstones are its delta);
- **after**: once every shard is rebuilt (``index.live.rebuild``: the one build path, which
compacts)
  and garbage-collected (``index.storage.gc``, grace 0, no replica serving an old version).

Measured in each state: manifest bytes; files in the store; *delta poll ms* (one replica's
``LiveShard.refresh`` when nothing is new: the two listings and set checks every replica does
every ``delta_poll_s``; median of 20, per shard); *rebuild planning ms*
(``index.storage.coverage.plan_shard``
plus the delta row count, what the Rebuilder does per shard per check; median of 10); and the
*embed driver peak RSS* of a re-run over the same N inputs (all present: the plan drops them all),
in a child process: ``pipelines.embed_plan`` (spill per shard, Arrow set operations), and for
reference (in the *before* state, the store it was written for) the previous driver's algorithm:
a Python set of every stored id and a list of every input URI.

Last, the moto-backed S3 suite (``tests/test_store_s3.py`` and ``tests/test_s3_end_to_end.py``)
runs in a child pytest; ``s3_suite_passed`` is true only when it passed in this run.

Writes ``benchmarks/results/control_plane.json`` (headline keys first) and ``control_plane.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, too

from benchmarks import common  # noqa: E402
from harness.stores import write_store  # noqa: E402
from harness.synthetic import gaussian_mixture  # noqa: E402
from index.ann.shard_index import ShardIndex  # noqa: E402
from index.live.delta import LiveShard  # noqa: E402
from index.live.parts import write_rows, write_tombstones  # noqa: E402
from index.live.rebuild import RebuildOptions, delta_rows, rebuild_shard  # noqa: E402
from index.rows import schema  # noqa: E402
from index.rows.sharding import shards_of, uri_id  # noqa: E402
from index.storage.coverage import plan_shard  # noqa: E402
from index.storage.gc import collect_garbage  # noqa: E402
from index.storage.manifest import load_manifest  # noqa: E402
from index.storage.store import Store  # noqa: E402


def write_catalogue(store: Store, n: int, args) -> list[str]:
    """N rows in batch-sized parts, routed by shard; returns the list file of their URIs."""
    vectors = gaussian_mixture(n, args.dim, clusters=256, seed=n)
    uris = [f"s3://catalogue/img-{i:08d}.jpg" for i in range(n)]
    ids = [uri_id(u) for u in uris]
    write_store(
        store, ids, uris, vectors, args.shards, model="bench", part_rows=args.batch_part_rows
    )
    return uris


def small_writes(store: Store, n: int, args) -> None:
    """API-sized writes (one row per part) and one-id deletes, spread over the shards."""
    rng = np.random.default_rng(n + 1)
    extra = gaussian_mixture(args.api_writes, args.dim, clusters=256, seed=n + 1)
    for i in range(args.api_writes):
        row_id = f"api-{i:06d}"
        shard = int(shards_of([row_id], args.shards)[0])
        table = schema.embeddings_table([row_id], [f"upload:{i}"], extra[i : i + 1])
        write_rows(store, shard, table)
    for i in rng.choice(n, args.deletes, replace=False):
        row_id = uri_id(f"s3://catalogue/img-{int(i):08d}.jpg")
        write_tombstones(store, int(shards_of([row_id], args.shards)[0]), [row_id])


def files_in(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def measure(store: Store, root: Path, args) -> dict:
    manifest = load_manifest(store)
    poll, planning = [], []
    for shard in range(args.shards):
        view = LiveShard(store, shard, ShardIndex.load(store, shard), args.dim, "ip")
        view.refresh()  # the first poll reads the delta; the ones measured find nothing new
        for _ in range(20):
            t0 = time.perf_counter()
            view.refresh()
            poll.append((time.perf_counter() - t0) * 1000)
        known: dict[str, int] = {}
        for _ in range(10):
            t0 = time.perf_counter()
            delta_rows(store, plan_shard(store, shard, manifest), known)
            planning.append((time.perf_counter() - t0) * 1000)
    return {
        "manifest_bytes": len((root / "manifest.json").read_bytes()),
        "files": files_in(root),
        "parts": sum(len(store.list_parts(s)) for s in range(args.shards)),
        "base_parts": sum(len(store.list_base_parts(s)) for s in range(args.shards)),
        "tombstone_parts": sum(len(store.list_tombstone_parts(s)) for s in range(args.shards)),
        "poll_ms": round(statistics.median(poll), 3),
        "planning_ms": round(statistics.median(planning), 3),
    }


DRIVER = textwrap.dedent(
    """
    import json, sys, psutil
    from index.storage.store import Store
    from pipelines.embed_plan import PlanCounts, ShardSpill, chunks, plan_pending
    from pipelines.inputs import iter_inputs
    from index.rows.sharding import uri_id
    store_uri, listing, shards, mode = sys.argv[1:5]
    store = Store(store_uri)
    base = psutil.Process().memory_info().rss
    counts = PlanCounts()
    if mode == "ours":  # pipelines.embed.plan_job, without the model probe
        spill = ShardSpill(int(shards))
        for chunk in chunks(iter_inputs([listing])):
            counts.inputs += len(chunk)
            spill.add_rows(chunk, [uri_id(u) for u in chunk])
        spill.finish()
        pending = plan_pending(store, spill, counts, failed=None, limit=None, block_rows=32)
        spill.close()
        todo = pending.rows
    else:  # the previous driver: every stored id in a set, every input URI in a list
        from index.rows import schema
        from pipelines.inputs import expand_inputs
        uris = expand_inputs([listing])
        present = set()
        for shard in range(int(shards)):
            parts = [store.path(p) for p in store.list_parts(shard) + store.list_base_parts(shard)]
            present.update(store.read_parquet(parts, columns=[schema.ID])[schema.ID].to_pylist())
        todo = sum(1 for u in uris if uri_id(u) not in present)
        counts.inputs = len(uris)
    # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec)
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    peak = int(status.split()[0]) * 1024
    print(json.dumps({"inputs": counts.inputs, "todo": todo, "base_rss": base, "peak_rss": peak}))
    """
)


def driver_rss(store: Store, listing: Path, args, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, store.uri, str(listing), str(args.shards), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    body = json.loads(out.stdout.strip().splitlines()[-1])
    assert body["todo"] == 0, body  # every input is already in the store
    return {
        "peak_rss_mib": round(body["peak_rss"] / 2**20, 1),
        "growth_mib": round((body["peak_rss"] - body["base_rss"]) / 2**20, 1),
    }


def run_size(n: int, args, scratch: Path) -> dict:
    root = scratch / f"store-{n}"
    store = Store(root)
    t0 = time.perf_counter()
    uris = write_catalogue(store, n, args)
    listing = scratch / f"inputs-{n}.txt"
    listing.write_text("".join(f"{u}\n" for u in uris))
    del uris
    options = RebuildOptions(threads=args.threads, tune=False)
    for shard in range(args.shards):  # a first version over the batch parts
        rebuild_shard(store, shard, options)
    small_writes(store, n, args)
    written_s = time.perf_counter() - t0
    before = measure(store, root, args)
    before["driver"] = driver_rss(store, listing, args, "ours")
    # the previous driver's algorithm, on the store it was written for (rows still in parts)
    before["driver_previous_algorithm"] = driver_rss(store, listing, args, "previous")
    t0 = time.perf_counter()
    for shard in range(args.shards):
        rebuild_shard(store, shard, options)
        collect_garbage(store, shard, grace_s=0)
    rebuild_s = time.perf_counter() - t0
    after = measure(store, root, args)
    after["driver"] = driver_rss(store, listing, args, "ours")
    print(f"N={n:,}: before {before}\n          after {after}", flush=True)
    return {
        "rows": n,
        "write_seconds": round(written_s, 1),
        "rebuild_seconds": round(rebuild_s, 1),
        "before": before,
        "after": after,
    }


def run_s3_suite() -> dict:
    t0 = time.perf_counter()
    tests = ["tests/test_store_s3.py", "tests/test_s3_end_to_end.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    seconds = round(time.perf_counter() - t0)
    return {"passed": proc.returncode == 0, "summary": tail, "seconds": seconds}


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    sizes = [r["rows"] for r in result["sizes"]]
    panels = [
        ("manifest bytes", lambda s: s["manifest_bytes"]),
        ("files in the store", lambda s: s["files"]),
        ("delta poll (ms, per shard)", lambda s: s["poll_ms"]),
        ("embed driver peak RSS (MiB)", lambda s: s["driver"]["peak_rss_mib"]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (title, get) in zip(axes, panels, strict=True):
        for state, style in (("before", "o--"), ("after", "o-")):
            ax.plot(sizes, [get(r[state]) for r in result["sizes"]], style, label=state)
        if title.startswith("embed"):
            previous = [r["before"]["driver_previous_algorithm"] for r in result["sizes"]]
            ax.plot(sizes, [p["peak_rss_mib"] for p in previous], "s:", label="previous driver")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set(title=title, xlabel="rows")
        ax.legend()
    fig.suptitle("Control plane vs catalogue size (before / after a compacting rebuild + GC)")
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--quick", action="store_true", help="sizes 1e4 and 1e5")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-part-rows", type=int, default=512)
    p.add_argument("--api-writes", type=int, default=500)
    p.add_argument("--deletes", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-s3", action="store_true")
    args = p.parse_args(argv)
    sizes = [10_000, 100_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="vs-control-") as tmp:
        runs = [run_size(n, args, Path(tmp)) for n in sizes]
    s3 = {"passed": False, "summary": "skipped"} if args.skip_s3 else run_s3_suite()
    first, last = runs[0]["after"], runs[-1]["after"]
    result = {
        "manifest_bytes_growth": round(last["manifest_bytes"] / first["manifest_bytes"], 3),
        "poll_ms_growth": round(last["poll_ms"] / first["poll_ms"], 3),
        "planning_ms_growth": round(last["planning_ms"] / first["planning_ms"], 3),
        "driver_rss_growth": round(
            last["driver"]["peak_rss_mib"] / first["driver"]["peak_rss_mib"], 3
        ),
        "driver_rss_growth_previous_algorithm": round(
            runs[-1]["before"]["driver_previous_algorithm"]["peak_rss_mib"]
            / runs[0]["before"]["driver_previous_algorithm"]["peak_rss_mib"],
            3,
        ),
        "s3_suite_passed": bool(s3["passed"]),
        "s3_suite": s3,
        "growth_is": f"{sizes[-1]:,} rows over {sizes[0]:,} rows, after rebuild + GC",
        "settings": {k: v for k, v in vars(args).items() if k != "quick"},
        "sizes": runs,
    }
    name = "control_plane_quick" if args.quick else "control_plane"
    common.write_and_plot(name, result, plot)
    print(json.dumps({k: v for k, v in result.items() if k not in ("sizes", "settings")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
