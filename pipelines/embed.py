"""Embed images into the store's sharded Parquet with Ray Data (issue #2).

    python pipelines/embed.py ../shared/data/images/caltech101 --store ./store
    ray job submit --working-dir . -- python pipelines/embed.py s3://bucket/photos --store s3://...

Shape of the job (see ``embed_stages``): the driver lists the inputs and drops those already in
the store; CPU tasks read, decode and crop; an actor pool (one GPU each when the cluster has
GPUs) embeds; CPU tasks write one Parquet part per shard for every ``part_rows`` rows. Bad
inputs become rows of ``<store>/errors/``; the job only fails for job-level reasons (bad
settings, another model's store, an unreachable cluster), never for one file.
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

import pyarrow as pa  # noqa: E402

from embedding import Embedder  # noqa: E402
from embedding.backbones import WeightsUnavailable  # noqa: E402
from embedding.model import MALLOC_ENV  # noqa: E402
from index import schema  # noqa: E402
from index.manifest import Manifest, ManifestMismatch, commit_manifest, load_manifest  # noqa: E402
from index.sharding import uri_id  # noqa: E402
from index.store import Store  # noqa: E402
from pipelines import embed_config as cfg  # noqa: E402
from pipelines.embed_config import ConfigError, EmbedJobConfig  # noqa: E402
from pipelines.embed_stages import (  # noqa: E402
    EmbedBatch,
    hash_batch,
    part_key,
    read_decode_batch,
    write_parts,
)
from pipelines.inputs import InputError, expand_inputs  # noqa: E402


@dataclass
class EmbedSummary:
    """What a run did; ``line()`` is the one-line report printed at the end."""

    store: str
    inputs: int = 0
    embedded: int = 0
    errors: int = 0
    skipped_present: int = 0  # id already in the store (same model: the manifest checks it)
    skipped_failed: int = 0  # recorded in errors/ by an earlier run (--retry-errors re-tries)
    duplicates: int = 0  # --dedup: same bytes as another input of this run
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
            skipped.append(f"{self.duplicates} duplicate contents")
        if self.deferred:
            skipped.append(f"{self.deferred} left by --limit")
        return (
            f"embedded {self.embedded} images ({', '.join(skipped)}), {self.errors} errors, "
            f"{self.images_per_s:.1f} images/s, store {self.store}"
        )

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "images_per_s": self.images_per_s,
            "steady_images_per_s": self.steady_images_per_s,
        }


# ---- the store's side ------------------------------------------------------------------------
def open_manifest(store: Store, config: EmbedJobConfig, name: str, weights: str, dim: int):
    """Create the manifest of a new store, or refuse one written by another model or sharding.

    ``num_shards``: an existing store's value wins; an explicit different value is an error.
    """
    existing = load_manifest(store)
    if existing is not None:
        num_shards = config.num_shards or existing.num_shards
        existing.check_compatible(name, weights, dim, num_shards)
        return existing
    num_shards = config.num_shards or cfg.DEFAULT_NUM_SHARDS

    def create(current: Manifest | None) -> Manifest:
        if current is not None:  # another job created it meanwhile: same rules
            current.check_compatible(name, weights, dim, num_shards)
            return current
        return Manifest(model=name, weights=weights, dim=dim, num_shards=num_shards, metric="ip")

    return commit_manifest(store, create)


def stored_ids(store: Store, num_shards: int) -> tuple[set[str], int]:
    """Ids already embedded (the ``id`` column of every committed part), and repeats among them."""
    ids: set[str] = set()
    total = 0
    for shard in range(num_shards):
        parts = [store.path(rel) for rel in store.list_parts(shard)]
        if parts:
            column = store.read_parquet(parts, columns=[schema.ID])[schema.ID]
            ids.update(column.to_pylist())
            total += len(column)
    return ids, total - len(ids)


def failed_uris(store: Store) -> set[str]:
    parts = store.list_error_parts()
    if not parts:
        return set()
    return set(store.read_parquet(parts, columns=[schema.URI])[schema.URI].to_pylist())


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
        ray.init(address="local", include_dashboard=False, _temp_dir=temp_dir)
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


def _blocks(columns: dict[str, list], rows_per_block: int) -> list[pa.Table]:
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})
    return [
        table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)
    ]


def content_ids(ray, uris: list[str], config: EmbedJobConfig, rows: int) -> tuple[dict, dict]:
    """``--dedup`` pre-pass: read every input once and hash its bytes (in Ray tasks)."""
    ds = ray.data.from_arrow(_blocks({schema.URI: uris}, rows)).map_batches(
        hash_batch,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=config.decode_cpus,
        fn_kwargs={"max_bytes": config.max_bytes},
    )
    ids, errors = {}, {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for uri, row_id, error in zip(
            batch[schema.URI].to_pylist(),
            batch[schema.ID].to_pylist(),
            batch[schema.ERROR].to_pylist(),
            strict=True,
        ):
            if error is None:
                ids[uri] = row_id
            else:
                errors[uri] = error
    return ids, errors


# ---- the job -----------------------------------------------------------------------------------
def run_job(config: EmbedJobConfig, log=print) -> EmbedSummary:
    """Embed every input of ``config`` not yet in the store; returns the counts."""
    store = Store(config.store)
    summary = EmbedSummary(store=store.uri)
    uris = expand_inputs(config.input)
    if not uris:
        raise InputError(f"no image files found in {', '.join(config.input)}")
    summary.inputs = len(uris)

    # name, weights tag, dim and crop size, from the model itself (weights load in ~1 s)
    probe = Embedder(replace(config.model_config(), device="cpu", threads=None))
    name, weights, dim, image_size = probe.name, probe.weights_tag, probe.dim, probe.image_size
    del probe
    manifest = open_manifest(store, config, name, weights, dim)
    num_shards = manifest.num_shards

    present, summary.store_duplicates = stored_ids(store, num_shards)
    if summary.store_duplicates:
        log(f"warning: {summary.store_duplicates} ids are stored more than once in {store.uri}")
    failed = set() if config.retry_errors else failed_uris(store)
    todo = [u for u in uris if u not in failed]
    summary.skipped_failed = len(uris) - len(todo)

    batch_size = config.batch_size
    ray = None
    if config.dedup:
        ray = connect_ray(config.address, config.ray_temp_dir)
        rows = config.read_batch or batch_size or cfg.CPU_BATCH_SIZE
        ids_by_uri, read_errors = content_ids(ray, todo, config, rows)
        if read_errors:
            err_uris = sorted(read_errors)
            table = schema.errors_table(
                err_uris, [read_errors[u] for u in err_uris], ["read"] * len(err_uris)
            )
            key = part_key([f"{u}\tNone" for u in err_uris])
            store.write_parquet(table, f"{store.errors_dir}/{store.new_part_name(key)}")
            summary.errors += len(err_uris)
            summary.error_stages["read"] = len(err_uris)
        pending, seen = [], set()
        for uri in todo:
            row_id = ids_by_uri.get(uri)
            if row_id is None:
                continue
            if row_id in present:
                summary.skipped_present += 1
            elif row_id in seen:
                summary.duplicates += 1
            else:
                seen.add(row_id)
                pending.append((uri, row_id))
    else:
        pending = []
        for uri in todo:
            row_id = uri_id(uri)
            if row_id in present:
                summary.skipped_present += 1
            else:
                pending.append((uri, row_id))
    if config.limit is not None and len(pending) > config.limit:
        summary.deferred = len(pending) - config.limit
        pending = pending[: config.limit]
    if not pending:
        return summary

    ray = ray or connect_ray(config.address, config.ray_temp_dir)
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if gpus else 0.0)
    actors = config.actors or default_actors(resources, num_gpus)
    actor_cpus = config.actor_cpus or (cfg.GPU_ACTOR_CPUS if num_gpus else cfg.CPU_ACTOR_CPUS)
    batch_size = batch_size or (cfg.GPU_BATCH_SIZE if num_gpus else cfg.CPU_BATCH_SIZE)
    rows = config.read_batch or batch_size
    model = asdict(config.model_config())
    model["device"] = "cuda" if num_gpus else "cpu"
    resize_size = round(image_size * 256 / 224)  # prepare()'s default short side

    blocks = _blocks(
        {schema.URI: [u for u, _ in pending], schema.ID: [i for _, i in pending]}, rows
    )
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        read_decode_batch,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=config.decode_cpus,
        fn_kwargs={
            "image_size": image_size,
            "resize_size": resize_size,
            "max_pixels": config.max_pixels,
            "max_bytes": config.max_bytes,
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
        runtime_env={"env_vars": malloc_env()},
    )
    ds = ds.map_batches(
        write_parts,
        batch_size=config.part_rows,
        batch_format="pyarrow",
        num_cpus=config.write_cpus,
        fn_kwargs={"store_uri": store.uri, "num_shards": num_shards},
    )
    each = f"{num_gpus:g} GPU" if num_gpus else f"{actor_cpus:g} CPU"
    threads = config.threads or ("auto" if num_gpus else "cores/actors")
    log(
        f"embedding {len(pending)} images with {actors} x {name} ({each}, {threads} threads "
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
    summary.seconds = time.perf_counter() - started
    if first_n:
        summary.first_batch_seconds = first - started_wall
        summary.first_batch_images = first_n
        summary.model_span_seconds = last - first
    summary.error_stages = dict(stages)
    return summary


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
