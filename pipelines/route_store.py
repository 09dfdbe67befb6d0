"""Ray job: lay a store out again in the routed layout, each row in the shard of its vector.

    visual-search route SRC DST --shards N [--sample-rows 50000] [--cells-per-shard 8]
    python pipelines/route_store.py SRC DST --shards N [--address auto] [--num-cpus 1]

The routed layout (``index.ann.routing``) places a row by its vector's nearest cell of a coarse
quantizer trained once per store, so a query visits a few shards instead of all. This job writes
a routed copy of a store into an empty root ``DST``; run on a routed store it is also the
rebalance: the router is trained again on today's rows and every row placed by it.

1. **Sample** (a Ray task per source shard): each task reads its shard's *visible* rows as the
   index build does (``index.live.rebuild``: the live version's base parts and the parts it
   does not cover, deletes applied and the newest copy of an id kept, ``index.rows.visibility``)
   and keeps each image row with a seeded random priority below a rate (about ``1.2 x
   sample_rows`` images over the store, from the parts' row counts); the driver keeps the
   ``sample_rows`` lowest priorities: a uniform sample of the visible images, in memory
   ``sample_rows x dim``, whatever the store's size.
2. **Train** the router on the driver (``train_router``: k-means cells, cells grouped into
   shards, the default probe measured on held-out rows).
3. **Route** (a Ray task per source shard): the shard's visible rows again, each placed by the
   router (region rows with their image, ``route_region_rows``) and written with every column
   (ids, URIs, sizes, ``ingested_at``, metadata) as parts of ``DST``'s shards
   (``pipelines.shard_parts``).
4. **Deletes carried** (a Ray task per id hash shard, only when the source has deletes): the
   embedding job must not bring a deleted image back (``pipelines.embed_plan``), so the newest
   delete of every id that is visible nowhere is written to ``DST`` as a tombstone part of its
   id's hash shard. Ids and deletes meet bucket by bucket (spilled by hash shard into ``DST``'s
   staging folder), never all at once; an id that is visible is left out, since a delete with
   its row's stamp (a routed write's, ``serve.writes``) would hide the copy.
5. **Commit**: the router is saved (``save_router``) and ``DST``'s manifest committed last
   (layout "routed", the source's model, dimension, metric, id scheme, region grid and metadata
   schema): until then ``DST`` has no manifest and nothing reads it. ``build_index`` on ``DST``
   then builds its shards as any store's.

``DST`` must be empty: a job that died leaves a partial copy without a manifest; remove it and
run again. The source is only read, each shard as it is when step 3 reads it: rows written to
the source after that are not in the copy (route a store no one writes to, or run the
embedding job on ``DST`` afterwards: it skips what the copy holds).
"""

from __future__ import annotations

import argparse
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python pipelines/route_store.py, ray job submit)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.job_python import require_project_python  # noqa: E402

if __name__ == "__main__":  # a job under a Python without the project: say so, exit 2
    require_project_python("pipelines/route_store.py")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from index.ann.routing import (  # noqa: E402
    CELLS_PER_SHARD,
    Router,
    RoutingError,
    route_region_rows,
    save_router,
    train_router,
)
from index.live.rebuild import read_rows, read_tombstones, source_rows  # noqa: E402
from index.rows import schema  # noqa: E402
from index.rows.regions import parent_of, per_image  # noqa: E402
from index.rows.sharding import shards_of  # noqa: E402
from index.rows.visibility import newest_deletes, read_visible  # noqa: E402
from index.storage.coverage import plan_shard  # noqa: E402
from index.storage.manifest import Manifest, commit_manifest, load_manifest  # noqa: E402
from index.storage.store import Store, parse_storage_options  # noqa: E402
from pipelines.embed_config import PART_BYTES  # noqa: E402
from pipelines.shard_parts import part_key, write_shard_parts  # noqa: E402

SAMPLE_ROWS = 50_000
OVERSAMPLE = 1.2  # the rate draws this many times sample_rows (deletes and copies lower it)
ROW_BYTES = 64  # a row's id, uri, sizes and stamp besides its vector, roughly


class RouteError(ValueError):
    """The job cannot run as asked (no source, a destination that is not empty, ...)."""


@dataclass
class RouteSummary:
    src: str
    dst: str
    rows: int = 0  # rows written to dst
    hidden: int = 0  # source rows left out: older copies of an id, deleted rows
    sample: int = 0  # images the router was trained on
    router: str = ""  # its file in dst
    default_probe: int = 0
    coverage: list[float] = field(default_factory=list)  # top-10 coverage at probe 1, 2, ...
    shard_rows: list[int] = field(default_factory=list)  # rows per dst shard
    parts: int = 0
    deletes: int = 0  # tombstones carried over (ids deleted and visible nowhere)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        sizes = self.shard_rows or [0]
        mean = sum(sizes) / len(sizes)
        return [
            f"routed {self.rows:,} rows of {self.src} into {len(self.shard_rows)} shards of "
            f"{self.dst} in {self.seconds:.1f}s ({self.hidden:,} hidden rows left out, "
            f"{self.deletes:,} deletes carried, {self.parts} parts)",
            f"router {self.router}: trained on {self.sample:,} sampled images; "
            f"default probe {self.default_probe} shard(s)",
            "top-10 coverage by shards probed: "
            + ", ".join(f"{p}: {c:.3f}" for p, c in enumerate(self.coverage, start=1)),
            "shard sizes: "
            + ", ".join(f"{s}: {n:,}" for s, n in enumerate(self.shard_rows))
            + f" (largest {max(sizes) / mean if mean else 0:.2f}x the mean)",
        ]


# ---- the tasks (plain functions: the driver runs them as Ray tasks) ----------------------------
def visible_rows(store: Store, shard: int, dim: int) -> tuple[pa.Table, pa.Table | None, int]:
    """(visible rows of ``shard`` sorted by id, the deletes applied, rows left out): what the
    index build reads (``index.live.rebuild``), the same rules."""
    plan = plan_shard(store, shard)
    tombstones = read_tombstones(store, plan)
    table, hidden = read_visible(read_rows(store, plan, dim), tombstones)
    return table, tombstones, hidden


def sample_shard(store: Store, shard: int, dim: int, rate: float, seed: int) -> dict:
    """The shard's hidden rows and deletes, and its visible image rows drawn with priority
    below ``rate`` (their priorities and vectors)."""
    table, tombstones, hidden = visible_rows(store, shard, dim)
    ids = table[schema.ID].to_pylist()
    images = np.fromiter((parent_of(i) == i for i in ids), bool, len(ids))
    priority = np.random.default_rng([seed, shard]).random(len(ids))
    keep = np.flatnonzero(images & (priority < rate))
    return {
        "hidden": hidden,
        "deletes": 0 if tombstones is None else tombstones.num_rows,
        "priority": priority[keep],
        "vectors": schema.arrow_to_vectors(table[schema.EMBEDDING].take(pa.array(keep))),
    }


def route_shard(
    src: Store, dst: Store, shard: int, dim: int, router: Router, staging: str | None
) -> dict:
    """Write the shard's visible rows into ``dst``'s shards by ``router``; with ``staging``
    also spill their ids and the shard's deletes there by id hash shard (step 4)."""
    table, tombstones, _ = visible_rows(src, shard, dim)
    shards, parts = np.zeros(0, np.int32), 0
    if table.num_rows:
        vectors = schema.arrow_to_vectors(table[schema.EMBEDDING])
        shards = route_region_rows(table[schema.ID].to_pylist(), router.shards_of(vectors))
        part_rows = max(256, PART_BYTES // (dim * 4 + ROW_BYTES))
        parts = write_shard_parts(dst, table, shards, part_rows)
    if staging is not None:
        _spill_by_bucket(dst, staging, "ids", shard, table.select([schema.ID]), router.num_shards)
        deletes = newest_deletes(tombstones)
        if deletes is not None:
            _spill_by_bucket(dst, staging, "deletes", shard, deletes, router.num_shards)
    return {"counts": np.bincount(shards, minlength=router.num_shards), "parts": parts}


def _spill_by_bucket(
    store: Store, staging: str, kind: str, shard: int, table: pa.Table, buckets: int
) -> None:
    keys = shards_of(table[schema.ID].to_pylist(), buckets)
    for bucket in np.unique(keys):
        path = posixpath.join(staging, kind, f"b{bucket:05d}", f"s{shard:05d}.parquet")
        store.write_parquet(table.filter(pa.array(keys == bucket)), path)


def carry_deletes(dst: Store, staging: str, bucket: int) -> int:
    """Write the newest delete of each id of hash shard ``bucket`` that no shard shows as a
    tombstone part of ``dst``'s shard ``bucket``; returns the deletes written."""
    deletes = _read_spilled(dst, posixpath.join(staging, "deletes", f"b{bucket:05d}"))
    if deletes is None:
        return 0
    deletes = newest_deletes(deletes)
    visible = _read_spilled(dst, posixpath.join(staging, "ids", f"b{bucket:05d}"))
    if visible is not None:
        seen = pc.is_in(deletes[schema.ID], value_set=visible[schema.ID].combine_chunks())
        deletes = deletes.filter(pc.invert(seen))
    if deletes.num_rows:
        table = deletes.cast(schema.TOMBSTONES_SCHEMA)
        name = dst.new_part_name(part_key(table[schema.ID].to_pylist()))
        dst.write_parquet(table, posixpath.join(dst.tombstones_dir(bucket), name))
    return deletes.num_rows


def _read_spilled(store: Store, folder: str) -> pa.Table | None:
    names = store.ls(folder)
    return store.read_parquet([posixpath.join(folder, n) for n in names]) if names else None


# ---- the driver ---------------------------------------------------------------------------------
def check_destination(src: Store, dst: Store) -> Manifest:
    """The source's manifest; a RouteError unless the source has one and ``dst`` is empty."""
    if src == dst:
        raise RouteError(f"source and destination are both {src.uri}: route into a new root")
    manifest = load_manifest(src)
    if manifest is None:
        raise RouteError(f"{src.uri} has no manifest: nothing to route")
    there = dst.ls(dst.root)
    if there:
        raise RouteError(
            f"{dst.uri} is not empty ({', '.join(there[:5])}): route into an empty "
            "root (a partial copy from a job that died can be removed and the job run again)"
        )
    return manifest


def route_store(
    src: Store,
    dst: Store,
    num_shards: int,
    sample_rows: int = SAMPLE_ROWS,
    cells_per_shard: int = CELLS_PER_SHARD,
    seed: int = 0,
    *,
    address: str | None = None,
    num_cpus: float = 1.0,
    progress: bool = True,
) -> RouteSummary:
    """Write a routed copy of ``src``'s visible rows into the empty ``dst`` (module docstring);
    uses the connected Ray, else joins ``address`` (None: $RAY_ADDRESS or a local Ray)."""
    t0 = time.perf_counter()
    if num_shards < 1 or sample_rows < 1:
        raise RouteError(f"shards and sample rows must be >= 1, got {num_shards}, {sample_rows}")
    manifest = check_destination(src, dst)
    summary = RouteSummary(src=src.uri, dst=dst.uri)
    dim = manifest.dim
    raw = {s: source_rows(src, plan_shard(src, s, manifest)) for s in range(manifest.num_shards)}
    images = sum(raw.values()) / per_image(manifest.regions)
    rate = min(1.0, OVERSAMPLE * sample_rows / max(images, 1.0))

    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    largest = max(
        (n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0
    )

    def tasks(fn, name: str, calls: dict) -> dict:
        """``fn(*args)`` per key of ``calls`` as Ray tasks (biggest source shard first)."""
        remote = ray.remote(fn)
        pending = {}
        for key, (args, rows) in sorted(calls.items(), key=lambda kv: -kv[1][1]):
            # the shard's rows read, sorted and taken apart: about 3 copies
            memory = int(min(3 * rows * (dim * 4 + ROW_BYTES), largest or np.inf)) or None
            options = {"num_cpus": num_cpus, "memory": memory, "name": f"{name}-{key}"}
            pending[remote.options(**options).remote(*args)] = key
        return _gather(ray, pending, name, progress)

    sampled = tasks(
        sample_shard, "route-sample", {s: ((src, s, dim, rate, seed), raw[s]) for s in raw}
    )
    summary.hidden = sum(r["hidden"] for r in sampled.values())
    has_deletes = any(r["deletes"] for r in sampled.values())
    priority = np.concatenate([sampled[s]["priority"] for s in sorted(sampled)])
    vectors = np.concatenate([sampled[s]["vectors"] for s in sorted(sampled)])
    del sampled
    order = np.argsort(priority, kind="stable")[:sample_rows]
    sample = vectors[order]
    summary.sample = len(sample)
    del vectors, priority
    try:
        router = train_router(sample, num_shards, manifest.metric, cells_per_shard, seed)
    except RoutingError as e:
        raise RouteError(f"{src.uri}: {len(sample)} visible images sampled: {e}") from None
    del sample
    summary.default_probe, summary.coverage = router.default_probe, list(router.coverage)

    staging = dst.path("_staging", f"route-{int(time.time())}-{uuid.uuid4().hex[:8]}")
    spill = staging if has_deletes else None
    try:
        router_ref = ray.put(router)
        routed = tasks(
            route_shard,
            "route-write",
            {s: ((src, dst, s, dim, router_ref, spill), raw[s]) for s in raw},
        )
        counts = np.sum([r["counts"] for r in routed.values()], axis=0)
        summary.shard_rows = [int(c) for c in counts]
        summary.rows = sum(summary.shard_rows)
        summary.parts = sum(r["parts"] for r in routed.values())
        if spill is not None:
            carried = tasks(
                carry_deletes, "route-deletes", {b: ((dst, spill, b), 0) for b in range(num_shards)}
            )
            summary.deletes = sum(carried.values())
    finally:
        dst.rm(staging, recursive=True)
    summary.router = save_router(dst, router)

    def create(current: Manifest | None) -> Manifest:
        if current is not None:
            raise RouteError(f"{dst.uri} got a manifest while the job ran: another writer")
        return Manifest(
            model=manifest.model,
            weights=manifest.weights,
            dim=dim,
            num_shards=num_shards,
            metric=manifest.metric,
            id_scheme=manifest.id_scheme,
            metadata=dict(manifest.metadata),
            regions=manifest.regions,
            layout="routed",
            router=summary.router,
        )

    commit_manifest(dst, create)
    summary.seconds = time.perf_counter() - t0
    return summary


def _gather(ray, pending: dict, name: str, progress: bool) -> dict:
    """Results by key as the tasks finish; the first failure stops the job (nothing is
    committed: ``dst`` has no manifest yet)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc=name, unit="shard")
    out = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done[0])
            out[key] = ray.get(done[0])
            if bar is not None:
                bar.update(1)
    finally:
        for ref in pending:
            ray.cancel(ref)
        if bar is not None:
            bar.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Copy a store's visible rows into an empty root in the routed layout: each "
        "row in the shard of its vector (the router trained on a sample of the store)."
    )
    parser.add_argument("src", help="the store to read (any layout)")
    parser.add_argument("dst", help="an empty root for the routed copy")
    parser.add_argument("--shards", type=int, required=True, help="shards of the copy")
    parser.add_argument("--sample-rows", type=int, default=SAMPLE_ROWS, help="images sampled")
    parser.add_argument("--cells-per-shard", type=int, default=CELLS_PER_SHARD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or local)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per task")
    parser.add_argument(
        "--storage-option",
        action="append",
        dest="storage_options",
        metavar="KEY=VALUE",
        help="fsspec option of both stores (repeatable)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    options = parse_storage_options(args.storage_options)
    try:
        summary = route_store(
            Store(args.src, options),
            Store(args.dst, options),
            args.shards,
            args.sample_rows,
            args.cells_per_shard,
            args.seed,
            address=args.address,
            num_cpus=args.num_cpus,
            progress=args.progress,
        )
    except RouteError as e:
        print(f"route: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
