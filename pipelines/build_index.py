"""Ray job: build the shard indexes of a store, one Ray task per shard, in parallel.

    python pipelines/build_index.py --store /data/store [--memory-budget 4G] [--shards 0,3]
        [--force] [--num-cpus 1] [--address auto] [--config build.yaml]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/build_index.py --store /abs/path/or/s3://bucket/store

What it does: for every shard that is not up to date (``index.storage.coverage``: a part or
tombstone part
its live version does not cover, or no version yet), a task (``num_cpus`` and a ``memory=``
request estimated from the shard's row count, placed on a ``shard_host`` node when the cluster has
such nodes) runs ``index.live.rebuild.rebuild_shard``, the one build path the serving app's rebuilds
use too: it reads the rows, applies the tombstones, builds, compacts the rows into a few base
parts and commits the new version. Shards already up to date cost two directory listings:
re-running with no new data is a no-op that starts no tasks (and no Ray).

A shard's build commits only while the live version it started from is still live (its parent,
``index.storage.publish``): when another build (the serving app's ``Rebuilder``, another job)
committed first, the task discards its version and plans again, and the shard counts as up to
date, built, or, when builds kept landing first, ``superseded`` (not a failure; run again).

Commit granularity: one manifest commit per finished shard. Shards are independent (a row lives
in exactly one), so there is no cross-shard invariant a single commit would protect, while
per-shard commits make each shard live as soon as it is ready and keep finished work when a later
shard fails or the job is killed (the re-run skips it). Each commit is an atomic create, and a
crash before it leaves the previous version live: a version directory nobody names is invisible.

Before any shard of a new store is built, the driver decides the store's transform
(``--transform``, default ``auto``: the written rule of ``index.ann.transform.choose_transform``)
and, when there is one, learns it on a sample of the rows and commits it
(``index.live.transform_fit``): every shard then indexes, reranks and scores in that reduced
space. Later builds keep the store's choice; asking another one is refused.

The store must be readable by every node (a shared path, or an object store URI).
YAML config keys are the ``BuildConfig`` field names; command-line flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python pipelines/build_index.py, ray job submit)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.job_python import require_project_python  # noqa: E402

if __name__ == "__main__":  # a job under a Python without the project: say so, exit 2
    require_project_python("pipelines/build_index.py")

import yaml  # noqa: E402

from index.ann.policy import estimate_build_memory  # noqa: E402
from index.ann.transform import check_asked  # noqa: E402
from index.live.rebuild import RebuildOptions, rebuild_shard, source_rows  # noqa: E402
from index.live.transform_fit import ensure_transform  # noqa: E402
from index.storage.coverage import plan_shard  # noqa: E402
from index.storage.manifest import load_manifest  # noqa: E402
from index.storage.store import Store, parse_storage_options  # noqa: E402
from index.units import parse_bytes  # noqa: E402
from pipelines.store_args import add_store_args  # noqa: E402

log = logging.getLogger("build_index")


@dataclass
class BuildConfig:
    """Everything the job takes; validated by ``validate`` before anything runs."""

    store: str = ""
    storage_options: dict | None = None  # fsspec options of the store (endpoint, keys, ...)
    memory_budget: str = "4G"  # RAM a loaded shard index may use (codes + ids + centroids)
    shards: list[int] | None = None  # None: every shard
    force: bool = False  # rebuild even when the live version covers every part
    address: str | None = None  # Ray address; None: RAY_ADDRESS / a job's cluster / local
    num_cpus: float = 1.0  # Ray CPUs per shard task (fractional is fine on small machines)
    threads: int | None = None  # FAISS threads per task; None: max(1, round(num_cpus))
    seed: int = 0
    retrain: bool = False  # never reuse a live version's trained quantizer
    # custom Ray resource the build tasks are placed by: "auto" = shard_host when the cluster
    # has nodes with it (cluster.yaml's memory nodes), "" = none
    node_resource: str = "auto"
    progress: bool = True
    # the store's learned transform, chosen by its first build (index.ann.transform): "auto"
    # (the written rule), "none", "pca:D" or "whiten:D"; later builds keep the store's
    transform: str = "auto"

    def validate(self) -> BuildConfig:
        if not self.store:
            raise ValueError("store is required (--store URI)")
        parse_bytes(self.memory_budget)
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.shards is not None and any(s < 0 for s in self.shards):
            raise ValueError(f"shards must be >= 0, got {self.shards}")
        self.transform = check_asked(self.transform)
        return self

    @property
    def task_threads(self) -> int:
        return self.threads or max(1, round(self.num_cpus))


@dataclass
class BuildSummary:
    built: dict[int, int] = field(default_factory=dict)  # shard -> new live version
    skipped: list[int] = field(default_factory=list)  # already up to date
    # another build's commit made each of this job's builds old (index.live.rebuild), and the
    # shard was still not up to date after the last one: run the job again
    superseded: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # shard -> error
    vectors: int = 0
    seconds: float = 0.0
    shard_seconds: dict[int, float] = field(default_factory=dict)
    transform: str = ""  # what the store's transform is, and why (ensure_transform)

    def line(self) -> str:
        text = (
            f"built {len(self.built)} shard(s) ({self.vectors:,} vectors) in {self.seconds:.1f}s; "
            f"{len(self.skipped)} up to date; {len(self.failed)} failed"
        )
        if self.superseded:
            text += f"; {len(self.superseded)} superseded by other builds (run again)"
        if self.built:
            text += "; versions " + ", ".join(f"{s}:v{v}" for s, v in sorted(self.built.items()))
        if self.transform:
            text += f"; transform: {self.transform}"
        return text


def plan(store: Store, config: BuildConfig) -> tuple[dict[int, int], list[int]]:
    """Shards to build (shard -> rows it will read) and shards already up to date."""
    manifest = load_manifest(store)
    if manifest is None:
        raise ValueError(f"{store} has no manifest: run the embedding job first")
    shards = config.shards if config.shards is not None else list(range(manifest.num_shards))
    todo, fresh = {}, []
    for shard in shards:
        if shard >= manifest.num_shards:
            raise ValueError(f"shard {shard} out of range: the store has {manifest.num_shards}")
        shard_plan = plan_shard(store, shard, manifest)
        if shard_plan.up_to_date and not config.force:
            fresh.append(shard)
            continue
        todo[shard] = source_rows(store, shard_plan)
    return todo, fresh


def placement(resources: dict, node_resource: str) -> dict[str, float]:
    """The custom resource a build task asks for a sliver of, so it lands on such a node."""
    if node_resource == "auto":
        node_resource = "shard_host" if resources.get("shard_host") else ""
    return {node_resource: 0.001} if node_resource else {}


def run(config: BuildConfig) -> BuildSummary:
    """Build what is out of date, committing each shard as it finishes. Needs Ray only when
    something is to be built; uses the connected Ray if there is one."""
    config.validate()
    t0 = time.perf_counter()
    store = Store(config.store, config.storage_options)
    todo, fresh = plan(store, config)
    summary = BuildSummary(skipped=fresh)
    if not todo:
        summary.seconds = time.perf_counter() - t0
        return summary
    # before any shard is built: every shard indexes in the space the first build chose
    _, summary.transform = ensure_transform(store, config.transform, config.seed)

    import ray

    if not ray.is_initialized():
        ray.init(address=config.address, log_to_driver=False)
    dim = load_manifest(store).dim
    largest_node = max(
        (n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0
    )
    remote = ray.remote(rebuild_shard)
    extra = placement(ray.cluster_resources(), config.node_resource)
    options = RebuildOptions(
        memory_budget=config.memory_budget,
        seed=config.seed,
        force=config.force,
        retrain=config.retrain,
        threads=config.task_threads,
    )
    pending = {}
    for shard, rows in sorted(todo.items(), key=lambda kv: -kv[1]):  # biggest first
        memory = estimate_build_memory(rows, dim)
        if largest_node and memory > largest_node:
            log.warning(
                "shard %d needs ~%.1f GiB to build, more than any node offers (%.1f GiB); "
                "asking for the largest node",
                shard,
                memory / 2**30,
                largest_node / 2**30,
            )
            memory = int(largest_node)
        ref = remote.options(
            num_cpus=config.num_cpus,
            memory=memory,
            resources=extra,
            name=f"build-index-shard-{shard}",
        ).remote(store, shard, options)
        pending[ref] = shard

    bar = _progress(len(pending), config.progress)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        shard = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as e:  # one shard failing must not lose the others' work
            summary.failed[shard] = f"{type(e).__name__}: {e}"
            log.error("shard %d failed: %s", shard, e)
        else:
            if not result["built"] and result.get("reason") != "up to date":
                summary.superseded.append(shard)  # other builds kept committing first
            elif not result["built"]:  # up to date meanwhile (another build committed it)
                summary.skipped.append(shard)
            else:
                summary.built[shard] = result["version"]
                summary.vectors += result["count"]
                summary.shard_seconds[shard] = result["seconds"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"shard {shard} done")
    if bar is not None:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="shard indexes", unit="shard")


def load_config(argv: list[str] | None = None) -> BuildConfig:
    """BuildConfig from an optional YAML file, overridden by command-line flags."""
    parser = argparse.ArgumentParser(description="Build per-shard FAISS indexes on Ray.")
    parser.add_argument("--config", help="YAML file with BuildConfig fields")
    add_store_args(parser)
    parser.add_argument("--memory-budget", help="RAM per loaded shard index, e.g. 4G")
    parser.add_argument("--shards", help="comma-separated subset, e.g. 0,3")
    parser.add_argument("--force", action="store_true", default=None, help="rebuild all")
    parser.add_argument(
        "--retrain", action="store_true", default=None, help="never reuse a trained quantizer"
    )
    parser.add_argument(
        "--node-resource", help="Ray resource build tasks are placed by (auto: shard_host)"
    )
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or local)")
    parser.add_argument("--num-cpus", type=float, help="Ray CPUs per shard task")
    parser.add_argument("--threads", type=int, help="FAISS threads per task")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--transform",
        help="the store's learned transform, chosen by its first build: auto (default: the "
        "written rule, index.ann.transform), none, pca:D or whiten:D",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    args = parser.parse_args(argv)

    values: dict = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        known = {f.name for f in dataclasses.fields(BuildConfig)}
        unknown = set(loaded) - known
        if unknown:
            parser.error(f"unknown keys in {args.config}: {sorted(unknown)}")
        values.update(loaded)
    names = ("store", "memory_budget", "force", "retrain", "address", "num_cpus", "threads")
    for name in (*names, "seed", "node_resource", "transform"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.progress is not None:
        values["progress"] = args.progress
    if args.storage_options:
        values["storage_options"] = parse_storage_options(args.storage_options)
    if args.shards is not None:
        values["shards"] = [int(s) for s in args.shards.split(",") if s.strip()]
    if isinstance(values.get("shards"), int):
        values["shards"] = [values["shards"]]
    try:
        return BuildConfig(**values).validate()
    except (TypeError, ValueError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(argv)
    summary = run(config)
    print(summary.line(), flush=True)
    for shard, error in sorted(summary.failed.items()):
        print(f"shard {shard} failed: {error}", file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
