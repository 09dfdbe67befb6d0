"""Settings of the embedding job: one typed dataclass, from CLI flags and an optional YAML file.

Precedence: built-in defaults < ``--config job.yaml`` < explicit CLI flags. Everything is checked
here, at the edge, so a typo fails in a second with a message naming the setting, not an hour
into a cluster run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from embedding.config import DEFAULT_BACKBONE, MODEL_HELP, ModelConfig, model_error
from embedding.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from index.rows.regions import MAX_LEVELS
from index.storage.store import parse_storage_options
from pipelines.inputs import is_table_name
from pipelines.store_args import add_store_args

DEFAULT_NUM_SHARDS = 4
CPU_ACTOR_CPUS = 0.5  # fractional: a pool holding whole CPUs starves the decode tasks (RAY-HERE)
GPU_ACTOR_CPUS = 1.0
CPU_BATCH_SIZE = 32
# inputs per read+decode task unless --read-batch says otherwise (never fewer than batch_size):
# each task costs scheduling, stats and a worker hand-off in the driver, the raylet and Ray
# Data's stats actor; 32-row tasks spent ~5% of a 2-core box on that (embed_throughput.json)
READ_ROWS = 256
GPU_BATCH_SIZE = 256  # fp16 224 px convnet activations at 256 fit in ~2 GiB: any 8 GiB GPU
PART_BYTES = 64 * 2**20  # default Parquet part size: rows of one shard, ~64 MB of vectors


class ConfigError(ValueError):
    """A setting that cannot work, with a message naming it."""


@dataclass
class EmbedJobConfig:
    """What to embed, where to write it, and how the Ray job is shaped.

    ``None`` means "decide from the store or the cluster": ``num_shards`` from an existing
    manifest (else 4), ``num_gpus`` 1 per actor when the cluster has GPUs, ``actors`` one per GPU
    (else one per CPU of the cluster), ``actor_cpus`` 0.5 on CPU and 1 on GPU, ``batch_size`` 32
    on CPU and 256 on GPU, ``threads`` = the actor machine's cores divided by ``actors``.
    """

    input: list[str] = field(default_factory=list)  # folders, globs, list files, fsspec URIs
    # sidecar tables (CSV, Parquet, JSON lines) with a uri column: the rows' metadata columns
    # (an input that is itself such a table is one too; pipelines.sidecar)
    metadata: list[str] = field(default_factory=list)
    store: str = "./store"
    storage_options: dict | None = None  # fsspec options of the store (endpoint, keys, region)
    num_shards: int | None = None
    model: str = DEFAULT_BACKBONE
    weights: str = "default"  # "default", "none" (random, plumbing tests) or a .pth path
    batch_size: int | None = None
    actors: int | None = None  # embedding actor pool size
    actor_cpus: float | None = None  # CPUs reserved per actor (fractions allowed)
    num_gpus: float | None = None  # GPUs per actor; 0 forces CPU actors
    threads: int | None = None  # torch threads per actor
    decode_cpus: float = 1.0  # CPUs reserved per read+decode task
    read_batch: int | None = None  # inputs per read+decode task (default max(256, batch_size))
    part_rows: int | None = None  # rows per Parquet part (None: ~PART_BYTES of vectors)
    write_cpus: float = 0.25  # CPUs reserved per write task (it mostly waits on I/O)
    dedup: bool = False  # id = hash of the bytes, so one picture under two URIs is one row
    # region grid levels per image (index.rows.regions; 1: the whole image only); None: the
    # store's own value, else 1
    regions: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger declared images are decompression bombs
    max_bytes: int = DEFAULT_MAX_BYTES  # larger files are refused unread past this size
    retry_errors: bool = False  # re-try inputs already recorded in the errors Parquet
    limit: int | None = None  # embed at most this many new inputs (trials, benchmarks)
    address: str | None = None  # Ray address; default RAY_ADDRESS, else a new local Ray
    ray_temp_dir: str | None = None  # temp dir of a local Ray this job starts itself

    def __post_init__(self) -> None:
        if isinstance(self.input, (str, os.PathLike)):
            self.input = [self.input]
        if not isinstance(self.input, (list, tuple)):
            raise ConfigError(f"input: expected a path or a list of paths, got {self.input!r}")
        self.input = [os.fspath(i) if isinstance(i, os.PathLike) else str(i) for i in self.input]
        if isinstance(self.metadata, (str, os.PathLike)):
            self.metadata = [self.metadata]
        if not isinstance(self.metadata, (list, tuple)):
            raise ConfigError(f"metadata: expected a table path or a list, got {self.metadata!r}")
        self.metadata = [os.fspath(m) if isinstance(m, os.PathLike) else m for m in self.metadata]
        self.validate()

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input: give at least one folder, glob, list file or URI")
        if any(not str(i).strip() for i in self.input):
            raise ConfigError("input: empty string")
        for table in self.metadata:
            if not isinstance(table, str) or not is_table_name(table.strip()):
                raise ConfigError(
                    f"metadata: {table!r} is not a .csv, .parquet or .jsonl table with a uri column"
                )
        if not str(self.store).strip():
            raise ConfigError("store: empty")
        if (problem := model_error(self.model)) is not None:
            raise ConfigError(problem)
        names = ("num_shards", "batch_size", "threads", "read_batch", "limit", "actors", "regions")
        for name in (*names, "part_rows"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        for name in ("max_pixels", "max_bytes"):
            _check_int(name, getattr(self, name))
        for name in ("actor_cpus", "decode_cpus", "write_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name}: must be a number, got {value!r}")
            if value < 0 or (value == 0 and name != "num_gpus"):
                raise ConfigError(f"{name}: must be > 0 (fractions allowed), got {value!r}")
        if self.regions is not None and self.regions > MAX_LEVELS:
            raise ConfigError(f"regions: at most {MAX_LEVELS} grid levels, got {self.regions}")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options: must be a mapping of fsspec options")
        for name in ("dedup", "retry_errors"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")

    def model_config(self, threads: int | None = None) -> ModelConfig:
        return ModelConfig(name=self.model, weights=self.weights, threads=threads or self.threads)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")


# ---- reading it -------------------------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(EmbedJobConfig)}


def load_yaml(path: str) -> dict[str, Any]:
    """Settings from a YAML mapping; keys are field names (``-`` and ``_`` both accepted)."""
    import yaml

    try:
        with open(path) as f:
            body = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML: {e}") from None
    if not isinstance(body, dict):
        raise ConfigError(f"config: {path} must hold a mapping of settings")
    out = {}
    for key, value in body.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            known = ", ".join(_FIELDS)
            raise ConfigError(f"config: unknown setting {key!r} in {path}; known: {known}")
        out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(  # prog: embed.py, or "visual-search embed" (visual_search.cli)
        description="Embed images (folder, glob, list file or fsspec URI) into sharded Parquet.",
    )
    # Every default is None so we can tell "given on the command line" from "not given".
    p.add_argument("input", nargs="*", default=None, help="folders, globs, list files, URIs")
    p.add_argument(
        "--input",
        dest="input_flag",
        action="append",
        metavar="URI",
        help="an input, as a flag (repeatable; same as the positional inputs)",
    )
    p.add_argument("--config", help="YAML file with any of these settings (flags win)")
    p.add_argument(
        "--metadata",
        action="append",
        metavar="TABLE",
        help="sidecar table (CSV, Parquet or JSON lines) with a uri column and metadata columns "
        "stored with each row (repeatable; an input table file's own columns count too)",
    )
    add_store_args(p, store_help="store root URI (default ./store)")
    p.add_argument("--num-shards", type=int, help="shards of a new store (default 4)")
    p.add_argument("--model", help=f"backbone (default {DEFAULT_BACKBONE}): {MODEL_HELP}")
    p.add_argument(
        "--weights",
        help="'default' (the library's pretrained weights, from its cache), a weights file, an "
        "open_clip pretrained tag, or 'none' (random, tests only)",
    )
    p.add_argument("--batch-size", type=int, help="images per model call (32 CPU / 256 GPU)")
    p.add_argument("--actors", type=int, help="model actors (default: 1 per GPU, else per CPU)")
    p.add_argument("--actor-cpus", type=float, help="CPUs per actor (0.5 CPU / 1 GPU)")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor (default 1 if any)")
    p.add_argument("--threads", type=int, help="torch threads per actor (default cores/actors)")
    p.add_argument("--decode-cpus", type=float, help="CPUs per read+decode task (default 1)")
    p.add_argument(
        "--read-batch", type=int, help="inputs per read+decode task (default max(256, batch))"
    )
    p.add_argument(
        "--part-rows", type=int, help="rows per Parquet part (default: about 64 MB of vectors)"
    )
    p.add_argument("--write-cpus", type=float, help="CPUs per write task (default 0.25)")
    p.add_argument("--dedup", action="store_const", const=True, help="content-hash ids")
    p.add_argument(
        "--regions",
        type=int,
        help="also store a vector per cell of an L-level grid of crops of each image, so a crop "
        "finds its photo (2: 5 vectors per image, 3: 14, 4: 30; default: the store's, else 1)",
    )
    p.add_argument("--max-pixels", type=int, help=f"bomb limit ({DEFAULT_MAX_PIXELS})")
    p.add_argument("--max-bytes", type=int, help=f"largest input file ({DEFAULT_MAX_BYTES})")
    p.add_argument(
        "--retry-errors", action="store_const", const=True, help="re-try recorded failures"
    )
    p.add_argument("--limit", type=int, help="embed at most N new inputs")
    p.add_argument("--address", help="Ray address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--ray-temp-dir", help="temp dir for a local Ray started by this job")
    return p


def config_from_args(argv: list[str] | None = None) -> EmbedJobConfig:
    """CLI flags over an optional YAML file over the defaults; ConfigError names what is wrong."""
    args = vars(build_parser().parse_args(argv))
    settings: dict[str, Any] = {}
    config_path = args.pop("config")
    if config_path:
        settings.update(load_yaml(config_path))
    args["input"] = (args.get("input") or []) + (args.pop("input_flag", None) or []) or None
    try:
        args["storage_options"] = parse_storage_options(args.get("storage_options"))
    except ValueError as e:
        raise ConfigError(f"storage_options: {e}") from None
    settings.update({k: v for k, v in args.items() if v is not None})
    try:
        return EmbedJobConfig(**settings)
    except TypeError as e:  # a YAML value of the wrong shape
        raise ConfigError(f"config: {e}") from None
