"""Embed images into the store's sharded Parquet with Ray Data (issue #2).

    python pipelines/embed.py ../shared/data/images/caltech101 --store ./store
    ray job submit --working-dir . -- python pipelines/embed.py s3://bucket/photos --store s3://...

Shape of the job: the driver streams the inputs and, one shard at a time, drops those already in
the store (``embed_plan``: memory flat in the catalogue size), staging the rest in the store in
shard order; CPU tasks read, decode and crop; an actor pool (one GPU each when the cluster has
GPUs) embeds; CPU tasks write Parquet parts of ``part_rows`` rows (about 64 MB), each of one
shard (``embed_stages``). Bad inputs become rows of ``<store>/errors/``; the job only fails for
job-level reasons (bad settings, another model's store, an unreachable cluster), never for one
file. Ids follow the store's id scheme (recorded in its manifest): the URI's hash, or with
``--dedup`` the bytes' hash; a store refuses runs of the other scheme.

Metadata: ``--metadata TABLE`` (CSV, Parquet or JSON lines with a ``uri`` column), or an input
table file with extra columns, gives each row typed metadata columns joined by URI
(``pipelines.sidecar``); the store's schema grows by ``index.rows.metadata``'s rule, and a column
whose type differs from the store's stops the run (exit 2) before it writes a row.
Exit status: 0 done (even with error rows), 1 job failure, 2 bad settings or inputs.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path[:1]:  # `python pipelines/embed.py`: sys.path[0] is pipelines/
    sys.path.insert(0, str(ROOT))

from pipelines.job_python import require_project_python  # noqa: E402

if __name__ == "__main__":  # a job under a Python without the project: say so, exit 2
    require_project_python("pipelines/embed.py", ("torch", "torchvision"))

from embedding import Embedder  # noqa: E402
from embedding.backbones import WeightsUnavailable  # noqa: E402
from embedding.model import MALLOC_ENV  # noqa: E402
from index.ann.routing import load_router  # noqa: E402
from index.rows import schema  # noqa: E402
from index.rows.sharding import uri_id  # noqa: E402
from index.storage.manifest import (  # noqa: E402
    Manifest,
    ManifestMismatch,
    commit_manifest,
    evolve_metadata,
    load_manifest,
)
from index.storage.store import Store  # noqa: E402
from pipelines import embed_config as cfg  # noqa: E402
from pipelines.embed_config import ConfigError, EmbedJobConfig  # noqa: E402
from pipelines.embed_plan import (  # noqa: E402
    PendingInputs,
    PlanCounts,
    ShardSpill,
    chunks,
    failed_uris,
    plan_pending,
    read_block,
    stage_uris,
)
from pipelines.embed_stages import (  # noqa: E402
    EmbedBatch,
    hash_batch,
    read_decode_batch,
    write_parts,
)
from pipelines.inputs import is_table_name, iter_inputs  # noqa: E402
from pipelines.shard_parts import place_orphans  # noqa: E402
from pipelines.sidecar import Sidecar  # noqa: E402
from pipelines.uris import InputError  # noqa: E402


@dataclass
class EmbedSummary:
    """What a run did; ``line()`` is the one-line report printed at the end."""

    store: str
    inputs: int = 0
    embedded: int = 0
    errors: int = 0
    skipped_present: int = 0  # id already in the store (same model: the manifest checks it)
    skipped_failed: int = 0  # recorded in errors/ by an earlier run (--retry-errors re-tries)
    duplicates: int = 0  # the same id twice among the inputs (--dedup: the same bytes)
    deferred: int = 0  # left for a later run by --limit
    parts: int = 0
    seconds: float = 0.0  # Ray Data execution, actor start-up and model load included
    first_batch_seconds: float = 0.0  # start until the model's first batch: the start-up cost
    first_batch_images: int = 0
    model_span_seconds: float = 0.0  # the model's first batch done -> its last batch done
    model_seconds: float = 0.0  # time spent inside the model, all actors together
    actors: int = 0
    error_stages: dict[str, int] = field(default_factory=dict)
    store_duplicates: int = 0  # ids stored more than once before this run (should stay 0)
    # metadata sidecars (pipelines.sidecar): their columns, rows read, rows skipped (no uri),
    # repeated uris (first kept), and staged inputs with and without a row
    metadata_columns: dict[str, str] = field(default_factory=dict)
    metadata_rows: int = 0
    metadata_skipped: int = 0
    metadata_duplicates: int = 0
    metadata_matched: int = 0
    metadata_missing: int = 0

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Images/s after the first batch: the rate once actors are up and the model loaded."""
        images = self.embedded - self.first_batch_images
        if self.model_span_seconds > 0 and images > 0:
            return images / self.model_span_seconds
        return self.images_per_s

    def line(self) -> str:
        skipped = [f"{self.skipped_present} skipped as already present"]
        if self.skipped_failed:
            skipped.append(f"{self.skipped_failed} skipped as failed before")
        if self.duplicates:
            skipped.append(f"{self.duplicates} duplicate inputs")
        if self.deferred:
            skipped.append(f"{self.deferred} left by --limit")
        line = (
            f"embedded {self.embedded} images ({', '.join(skipped)}), {self.errors} errors, "
            f"{self.images_per_s:.1f} images/s, store {self.store}"
        )
        if self.metadata_columns:
            line += (
                f"; metadata {', '.join(f'{k}:{v}' for k, v in self.metadata_columns.items())}: "
                f"{self.metadata_matched} rows matched, {self.metadata_missing} without a row, "
                f"{self.metadata_skipped} table rows without a uri skipped, "
                f"{self.metadata_duplicates} repeated uris"
            )
        return line

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "images_per_s": self.images_per_s,
            "steady_images_per_s": self.steady_images_per_s,
        }


# ---- the store's side ------------------------------------------------------------------------
def open_manifest(
    store: Store, config: EmbedJobConfig, name: str, weights: str, dim: int
) -> Manifest:
    """Create the manifest of a new store, or refuse one written by another model, sharding,
    id scheme (``--dedup`` names rows by their bytes; the default by their URI) or region grid
    (``--regions``; an existing store's grid when not given).

    ``num_shards``: an existing store's value wins; an explicit different value is an error.
    """
    id_scheme = "content" if config.dedup else "uri"
    existing = load_manifest(store)
    if existing is not None:
        num_shards = config.num_shards or existing.num_shards
        existing.check_compatible(name, weights, dim, num_shards, id_scheme, config.regions)
        return existing
    num_shards = config.num_shards or cfg.DEFAULT_NUM_SHARDS

    def create(current: Manifest | None) -> Manifest:
        if current is not None:  # another job created it meanwhile: same rules
            current.check_compatible(name, weights, dim, num_shards, id_scheme, config.regions)
            return current
        return Manifest(
            model=name,
            weights=weights,
            dim=dim,
            num_shards=num_shards,
            metric="ip",
            id_scheme=id_scheme,
            regions=config.regions or 1,
        )

    return commit_manifest(store, create)


# ---- Ray ---------------------------------------------------------------------------------------
def connect_ray(address: str | None = None, temp_dir: str | None = None):
    """Join ``--address`` or $RAY_ADDRESS (as under ``ray job submit``), else start a local Ray.

    A local Ray's workers find this repository through PYTHONPATH (inherited from the driver);
    under ``ray job submit --working-dir .`` the working dir is already on the workers' path.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        path = os.environ.get("PYTHONPATH", "")
        if str(ROOT) not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), path) if p)
        # the model actors' malloc settings for the whole (throwaway) job: its prestarted
        # workers then fit the actors, which start without a worker process of their own
        ray.init(
            address="local",
            include_dashboard=False,
            _temp_dir=temp_dir,
            runtime_env={"env_vars": malloc_env()},
        )
    return ray


def default_actors(resources: dict, num_gpus: float) -> int:
    """One actor per GPU; on CPU one single-threaded actor per CPU of the cluster.

    Measured on 2 cores (benchmarks/embed_throughput.py): two 1-thread actors kept ~100% of the
    bare 2-thread model's rate once started, one 2-thread actor ~80%: a multi-threaded forward
    stalls whenever decode or Ray takes one of its cores; single-threaded models do not.
    """
    if num_gpus:
        return max(1, int(resources.get("GPU", 0) // num_gpus))
    return max(1, int(resources.get("CPU", 1)))


def malloc_env() -> dict[str, str]:
    """``embedding.model.MALLOC_ENV`` unless turned off (VISUAL_SEARCH_MALLOC_TUNE=0)."""
    if os.environ.get("VISUAL_SEARCH_MALLOC_TUNE", "1") == "0":
        return {"VISUAL_SEARCH_MALLOC_TUNE": "0"}
    return dict(MALLOC_ENV)


def actor_runtime_env(ray) -> dict | None:
    """The model actors' runtime env: the malloc settings, unless the job's own runtime env
    carries them already (a local Ray from ``connect_ray``, or ``ray job submit
    --runtime-env-json``). An actor with a runtime env of its own cannot take one of the job's
    prestarted workers and waits for a new process (measured ~1-5 s on 2 cores)."""
    wanted = malloc_env()
    try:
        job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    except Exception:  # an older Ray without the runtime context's env: be explicit
        job_env = {}
    if all(job_env.get(k) == v for k, v in wanted.items()):
        return None
    return {"env_vars": wanted}


def _block_dataset(ray, store: Store, pending: PendingInputs, num_cpus: float):
    """A dataset of the staged rows, one block per staging row group, in staging order."""
    blocks = pending.blocks
    return ray.data.range(blocks, override_num_blocks=blocks).map_batches(
        read_block,
        batch_size=None,
        batch_format="numpy",
        num_cpus=num_cpus,
        fn_kwargs={"store": store, "pending": pending, "starts": pending.starts()},
    )


def hash_inputs(ray, store: Store, config: EmbedJobConfig, spill: ShardSpill, block_rows: int):
    """``--dedup``: stage the input URIs, hash every input's bytes in Ray tasks (their read
    errors are written to ``errors/`` there), stream the ``(uri, id)`` rows into the spill.
    Returns (inputs, read errors)."""
    staged = stage_uris(store, chunks(iter_inputs(config.input)), block_rows)
    errors = 0
    try:
        if not staged.files:
            return 0, 0
        ds = _block_dataset(ray, store, staged, config.decode_cpus).map_batches(
            hash_batch,
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=config.decode_cpus,
            fn_kwargs={"max_bytes": config.max_bytes, "store": store},
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            good = batch.filter(batch[schema.ERROR].is_null())
            errors += batch.num_rows - good.num_rows
            spill.add_rows(good[schema.URI].to_pylist(), good[schema.ID].to_pylist())
        return staged.rows, errors
    finally:
        store.rm(staged.staging, recursive=True)


def load_sidecar(store: Store, config: EmbedJobConfig, num_shards: int) -> Sidecar | None:
    """The job's metadata tables, spilled per shard, their columns merged into the store's
    schema (a type conflict raises ManifestMismatch before any row is written)."""
    tables = [*config.metadata, *(i for i in config.input if is_table_name(i.strip()))]
    if not tables:
        return None
    sidecar = Sidecar(num_shards)
    try:
        sidecar.load(tables)
        sidecar.store_schema = evolve_metadata(store, sidecar.counts.columns).metadata
    except BaseException:
        sidecar.close()
        raise
    return sidecar


def plan_job(ray_factory, store: Store, config: EmbedJobConfig, num_shards: int, summary):
    """Stream the inputs into a per-shard spill and stage what still needs embedding."""
    block_rows = config.read_batch or max(cfg.READ_ROWS, config.batch_size or 0)
    counts = PlanCounts()
    spill = ShardSpill(num_shards)
    sidecar = None
    try:
        sidecar = load_sidecar(store, config, num_shards)
        if config.dedup:
            counts.inputs, read_errors = hash_inputs(
                ray_factory(), store, config, spill, block_rows
            )
            summary.errors += read_errors
            if read_errors:
                summary.error_stages["read"] = read_errors
        else:
            for chunk in chunks(iter_inputs(config.input)):
                counts.inputs += len(chunk)
                spill.add_rows(chunk, [uri_id(u) for u in chunk])
        spill.finish()
        if counts.inputs == 0:
            raise InputError(f"no image files found in {', '.join(config.input)}")
        failed = None if config.retry_errors else failed_uris(store)
        pending = plan_pending(
            store,
            spill,
            counts,
            failed=failed,
            limit=config.limit,
            block_rows=block_rows,
            sidecar=sidecar,
            every_shard=config.dedup,
        )
    finally:
        spill.close()
        if sidecar is not None:
            sidecar.close()
            c = sidecar.counts
            summary.metadata_columns = dict(sidecar.store_schema)
            summary.metadata_rows, summary.metadata_skipped = c.rows, c.skipped
            summary.metadata_duplicates, summary.metadata_matched = c.duplicates, c.matched
            summary.metadata_missing = c.missing
    summary.inputs = counts.inputs
    summary.skipped_present = counts.skipped_present
    summary.skipped_failed = counts.skipped_failed
    summary.duplicates = counts.duplicates
    summary.deferred = counts.deferred
    summary.store_duplicates = counts.store_duplicates
    return pending


def part_rows_for(dim: int, config: EmbedJobConfig) -> int:
    """Rows per Parquet part: ``part_rows``, else about ``cfg.PART_BYTES`` of vectors."""
    return config.part_rows or max(256, cfg.PART_BYTES // (dim * 4 + 128))


# ---- the job -----------------------------------------------------------------------------------
def run_job(config: EmbedJobConfig, log=print) -> EmbedSummary:
    """Embed every input of ``config`` not yet in the store; returns the counts."""
    store = Store(config.store, config.storage_options)
    summary = EmbedSummary(store=store.uri)

    # name, weights tag, dim and crop, from the model itself (weights load in ~1 s)
    probe = Embedder(replace(config.model_config(), device="cpu", threads=None))
    name, weights, dim, crop = probe.name, probe.weights_tag, probe.dim, probe.crop
    del probe
    manifest = open_manifest(store, config, name, weights, dim)
    num_shards = manifest.num_shards
    config = replace(config, regions=manifest.regions)  # a store's grid is fixed at creation

    ray = None

    def ray_factory():
        nonlocal ray
        ray = ray or connect_ray(config.address, config.ray_temp_dir)
        return ray

    pending = plan_job(ray_factory, store, config, num_shards, summary)
    if summary.store_duplicates:
        log(f"warning: {summary.store_duplicates} ids are stored more than once in {store.uri}")
    if not pending.files:
        return summary
    try:
        _embed(ray_factory(), store, config, pending, summary, manifest, name, dim, crop, log)
    finally:
        store.rm(pending.staging, recursive=True)
    return summary


def _embed(ray, store, config, pending, summary, manifest, name, dim, crop, log) -> None:
    """Run the embedding dataset over the staged inputs, filling ``summary``."""
    num_shards, router = manifest.num_shards, load_router(store, manifest)  # routed: by vector
    routed = {"router": router, "staging": pending.staging, "regions": config.regions or 1}
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if gpus else 0.0)
    actors = config.actors or default_actors(resources, num_gpus)
    actor_cpus = config.actor_cpus or (cfg.GPU_ACTOR_CPUS if num_gpus else cfg.CPU_ACTOR_CPUS)
    batch_size = config.batch_size or (cfg.GPU_BATCH_SIZE if num_gpus else cfg.CPU_BATCH_SIZE)
    model = asdict(config.model_config())
    model["device"] = "cuda" if num_gpus else "cpu"

    ds = _block_dataset(ray, store, pending, config.decode_cpus)
    ds = ds.map_batches(
        read_decode_batch,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=config.decode_cpus,
        fn_kwargs={
            "crop": crop.to_dict(),  # the model's own resize, crop and interpolation
            "max_pixels": config.max_pixels,
            "max_bytes": config.max_bytes,
            "regions": config.regions or 1,  # each image's grid of region crops, if any
        },
    )
    ds = ds.map_batches(
        EmbedBatch,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        num_gpus=num_gpus or None,
        fn_constructor_kwargs={"model": model, "actors": actors},
        # glibc malloc settings from process start: the model thread page-faults otherwise
        runtime_env=actor_runtime_env(ray),
    )
    ds = ds.map_batches(
        write_parts,
        batch_size=part_rows_for(dim, config),
        batch_format="pyarrow",
        num_cpus=config.write_cpus,
        # the plan's time, not the write's: a delete during the job wins (pipelines.embed_plan)
        fn_kwargs={"store": store, "num_shards": num_shards, "ingested_at": pending.planned_at}
        | (routed if router is not None else {}),
    )
    each = f"{num_gpus:g} GPU" if num_gpus else f"{actor_cpus:g} CPU"
    threads = config.threads or ("auto" if num_gpus else "cores/actors")
    log(
        f"embedding {pending.rows} images with {actors} x {name} ({each}, {threads} threads "
        f"each, batch {batch_size}) into {num_shards} shards of {store.uri}"
    )
    summary.actors = actors
    stages: Counter[str] = Counter(summary.error_stages)
    started, started_wall = time.perf_counter(), time.time()
    first, first_n, last = float("inf"), 0, 0.0
    for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for t0, n0, t1 in zip(
            out["first_embedded_at"].to_pylist(),
            out["first_embedded_n"].to_pylist(),
            out["last_embedded_at"].to_pylist(),
            strict=True,
        ):
            if t0 is None:
                continue
            if t0 < first:  # an earlier model batch (rows of one batch may span two writes)
                first, first_n = t0, n0
            elif t0 == first:
                first_n += n0
            last = max(last, t1)
        summary.embedded += sum(out["embedded"].to_pylist())
        summary.model_seconds += sum(out["model_seconds"].to_pylist())
        summary.errors += sum(out["errors"].to_pylist())
        summary.parts += sum(out["parts"].to_pylist())
        for joined in out["error_stages"].to_pylist():
            stages.update(s for s in joined.split(",") if s)
    if router is not None:  # region rows whose image row another write batch held
        summary.parts += place_orphans(store, pending.staging, router)
    summary.seconds = time.perf_counter() - started
    if first_n:
        summary.first_batch_seconds = first - started_wall
        summary.first_batch_images = first_n
        summary.model_span_seconds = last - first
    summary.error_stages = dict(stages)


def main(argv: list[str] | None = None) -> int:
    try:
        config = cfg.config_from_args(argv)
        summary = run_job(config)
    except (ConfigError, InputError, ManifestMismatch, WeightsUnavailable) as e:
        print(f"embed.py: error: {e}", file=sys.stderr)
        return 2
    print(summary.line(), flush=True)
    if summary.errors:
        by_stage = ", ".join(f"{k} {v}" for k, v in sorted(summary.error_stages.items()))
        print(
            f"errors: {summary.errors} inputs could not be embedded ({by_stage}); "
            f"uri, stage and reason in {Store(config.store).errors_dir}/part-*.parquet",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
