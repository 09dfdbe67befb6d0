"""Typed configuration of the Serve application, validated once at the edge.

One ``ServeConfig`` describes everything the deployment graph needs: where the store is, which
model embeds queries (it must be the model that embedded the catalogue, checked against the
manifest at start), the resources and replica counts of each deployment, the shard deadline and
the request limits. It is read from a YAML file, from a plain dict (the ``args`` of a ``serve
deploy`` config, or ``serve run serve.app:app_builder key=value``) and from the environment:

- ``VISUAL_SEARCH_STORE``: the store root URI (overrides nothing that was given explicitly).
- ``VISUAL_SEARCH_SERVE_CONFIG``: a YAML file in this schema, read by ``serve run serve.app:app``.
- ``VISUAL_SEARCH_API_KEY``: the key write and admin endpoints require (``api_key``).
- ``VISUAL_SEARCH_STORAGE_OPTIONS``: fsspec options of the store as JSON (``storage_options``
  wins), e.g. ``{"endpoint_url": "http://minio:9000"}``; fsspec's and the AWS SDK's own
  variables (``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL``, ``AWS_*`` keys) work too.

Defaults suit a 2-core laptop: fractional CPUs so five-plus deployments schedule on two cores,
one replica each, no GPU unless the cluster has one (``num_gpus: auto`` on the embedder).

Defaults are safe for a port anyone can reach (``serve.http.security``): writes and ``/admin/*``
need ``api_key``, and an app without a key refuses them unless ``open_writes: true`` says that
anyone may write (the local demo on 127.0.0.1 does); callers without the key get the lower
``anon_max_*`` caps and no server-side error text.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedding.config import ModelConfig, model_error
from serve.deployment_settings import ConfigError, DeploymentSettings  # noqa: F401 (re-exported)

ENV_STORE = "VISUAL_SEARCH_STORE"
ENV_CONFIG = "VISUAL_SEARCH_SERVE_CONFIG"
ENV_API_KEY = "VISUAL_SEARCH_API_KEY"
MAX_K = 1000  # the HTTP contract: k in 1..1000


def _ingress_defaults() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.25, max_ongoing_requests=64)


def _embedder_defaults() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.5, num_gpus="auto", max_ongoing_requests=64)


def _searcher_defaults() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.25, max_ongoing_requests=64)


@dataclass
class ServeConfig:
    """Everything the Serve graph needs. ``store`` is required (argument, YAML or env)."""

    store: str = ""
    # fsspec options of the store (endpoint_url, key, secret, region...); None: from the env
    storage_options: dict | None = None
    app_name: str = "visual-search"
    route_prefix: str = "/"
    # false: vectors/ids only, no QueryEmbedder (stores no image model made: synthetic, external)
    image_queries: bool = True
    model: str = "efficientnet_lite0"  # the catalogue's model (refused at start otherwise)
    weights: str = "default"
    device: str = "auto"
    embed_threads: int | None = None  # torch threads per embedder replica (None: torch default)
    max_batch_size: int = 16  # @serve.batch of the embedder
    batch_wait_timeout_s: float = 0.005
    search_threads: int = 1  # FAISS OpenMP threads per searcher replica (many replicas share CPUs)
    # shard groups (serve.deployments.searcher): a searcher replica serves this many shards, one
    # call per group per query; None = every shard in one group (one box); 1 = a deployment per
    # shard. On a cluster, one memory node's shard_host slots (the group asks for that many).
    shards_per_group: int | None = None
    # search the shard groups inside the ingress replica (no actor hop per query): the lowest
    # latency on one box with one ingress replica; every ingress replica holds the shards then
    colocate_shards: bool = False  # (then without the recall canary, which needs deployments)
    # shards of a group searched at once (threads). Measured on this 2-core box, where the
    # ingress shares the cores: 16 shards of 1M x 256, wrk, c=1 QPS 67 / 93 with one thread vs
    # 53 / 71 with two; 4 shards of 250k 99 / 116 vs 107 / 130; at c=16 the difference is
    # inside the run-to-run spread (paired 16-over-1 ratios 0.57-0.80 with either). More
    # threads pay where cores sit idle
    search_parallel_shards: int = 1
    # queries arriving while a group replica searches are searched together next (one FAISS
    # batch); a lone query waits this long for company first (0: none; batches form under load)
    search_batch_wait_ms: float = 0.0
    search_max_batch: int = 64
    shard_deadline_ms: float = 1000.0  # a shard slower than this is left out: partial answer
    # how long a call waits for a shard it cannot do without: a write's stamp and hand-over, a
    # read by id, and a search none of whose shards answered within shard_deadline_ms (then 503)
    needed_shard_deadline_ms: float = 5000.0
    embed_deadline_ms: float = 15000.0  # embedding a query image on a busy CPU can take a while
    verify_budget_ms: float = 2000.0  # verify's wait for its checks (serve.http.verification)
    default_k: int = 10
    default_nprobe: int | None = None  # None: each index version's own default (meta.json)
    default_candidates: int | None = None  # per-shard rerank candidates; None: the index's default
    max_nprobe: int = 65536
    max_candidates: int = 10000
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    reload_interval_s: float = 30.0  # searchers poll the manifest for a new live version; 0 = off
    # searchers list the store for new parts/tombstones every delta_poll_s (0 = off: only writes
    # routed to a replica reach it)
    delta_poll_s: float = 0.5
    # unused for poll_idle_after_s, a replica's waits double up to these caps while nothing
    # changes (None: never); back at once on use or change (serve.deployments.idle)
    delta_poll_idle_max_s: float | None = 60.0
    reload_idle_max_s: float | None = 120.0
    poll_idle_after_s: float = 10.0
    # searchers report their version (index.storage.leases) this often; GC keeps it for the TTL
    lease_interval_s: float = 30.0
    lease_ttl_s: float = 120.0
    # tests only: a seeded per-replica wall-clock offset within +-clock_skew_ms (index.rows.clock)
    clock_skew_ms: int = 0
    # Authorization: Bearer <key> or X-API-Key. Writes (POST /images, DELETE /images/{id}) and
    # /admin/* need it; with no key they are refused unless open_writes opens them to anyone
    api_key: str = ""
    open_writes: bool = False  # true: writes and /admin/* without a key (a loopback demo only)
    writes: bool = True  # false: read-only app (403 writes_disabled, no Rebuilder)
    # callers without the key (anonymous) get these lower caps (never above the max_* above);
    # keyed callers get max_nprobe, max_candidates and max_pixels
    anon_max_nprobe: int = 256
    anon_max_candidates: int = 1000
    anon_max_pixels: int = 16_000_000
    # ... on a search's cost (keyed: MAX_K, 256 filter nodes, pools of MAX_K; serve.http.limits)
    anon_max_k: int = 100
    anon_max_filter_nodes: int = 16
    anon_max_shape_pool: int = 200  # merged hits dedup/diversify choose from (and regrow to)
    # thumbnails read a row's uri only under these roots: local dirs (absolute, file://) and
    # object-store prefixes (s3://bucket/images/); [] = none. A stored uri grants no access
    thumbnail_roots: list[str] = field(default_factory=list)
    thumbnail_timeout_s: float = 10.0  # a source read slower than this is image_unavailable
    # background rebuilds (serve.deployments.rebuilder, pipelines.rebuild): a shard is rebuilt when
    # its delta (new rows + tombstones) reaches rebuild_delta_rows or rebuild_delta_fraction of its
    # built rows, its rows' float32 vectors (what each query scans: the delta is searched by brute
    # force) rebuild_delta_bytes, or its parts (a round trip each when a replica starts)
    # rebuild_delta_parts (0 = that rule off); checked every rebuild_check_s (0 = on request only)
    rebuild_delta_rows: int = 100_000
    rebuild_delta_fraction: float = 0.1
    rebuild_delta_bytes: str = "64M"
    rebuild_delta_parts: int = 1000
    rebuild_check_s: float = 10.0
    rebuild_gc_grace_s: float = 60.0  # the previous version is deleted this long after a swap
    rebuild_drift_ratio: float = 1.5  # retrain when new rows sit this much farther from centroids
    rebuild_num_cpus: float = 1.0  # Ray CPUs of a rebuild task
    rebuild_threads: int = 1  # FAISS threads of a rebuild task
    rebuild_memory_budget: str = "4G"
    # custom Ray resource rebuild tasks are placed by ("auto": shard_host when nodes have it)
    rebuild_node_resource: str = "auto"
    # live recall canary (serve.deployments.canary): this fraction of fully answered searches is
    # recomputed exactly in the background (0 = off, no RecallCanary deployment), at most
    # canary_max_per_s a second (each scans every shard), recall@k over the last canary_window
    canary_fraction: float = 0.05
    canary_max_per_s: float = 0.5
    canary_window: int = 200
    canary_queue: int = 16
    canary_num_cpus: float = 0.05
    access_log: bool = True  # a line per HTTP request (ingress) and per call (replicas): metrics
    # Serve's log encoding: "JSON" = one JSON object per line with request_id, deployment,
    # replica and our endpoint/status/latency_ms fields; "TEXT" = Serve's plain lines
    log_encoding: str = "JSON"
    # how the ingress sends a query's searches to the shard groups: "grpc"
    # (DeploymentHandle.options(_by_reference=False): straight to the replica's gRPC server, no
    # object store) or "ray" (actor tasks). Measured on this 2-core box under wrk c=16, 64 routed
    # shards of 2M x 256, alternating: 353 / 312 QPS and 4.2 / 4.7 CPU-ms a query over gRPC
    # against 210 / 231 QPS and 7.8 / 7.1 ms as actor tasks (a no-op deployment behind the
    # ingress: 2.5-2.8 against 4.3 ms). Writes, reads by id, vectors for answer shaping and the
    # embedder's images always go as actor tasks: their payloads can pass gRPC's 4 MiB message
    # cap (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH); so does a search answer over it, retried
    handle_transport: str = "grpc"
    # a stopping replica's wait between checks for requests in flight (Serve's graceful_shutdown_*)
    shutdown_wait_s: float = 2.0
    # deployments
    ingress: DeploymentSettings = field(default_factory=_ingress_defaults)
    embedder: DeploymentSettings = field(default_factory=_embedder_defaults)
    searcher: DeploymentSettings = field(default_factory=_searcher_defaults)

    def __post_init__(self) -> None:
        for name in ("ingress", "embedder", "searcher"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _settings_from_dict(name, value))
        if not self.store:
            self.store = os.environ.get(ENV_STORE, "")
        if not self.api_key:
            self.api_key = os.environ.get(ENV_API_KEY, "")

    def open_store(self):
        """The store, opened with this config's fsspec options (else the environment's)."""
        from index.storage.store import Store

        return Store(self.store, self.storage_options)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(
            name=self.model, weights=self.weights, device=self.device, threads=self.embed_threads
        )

    def validate(self) -> ServeConfig:
        if not self.store:
            raise ConfigError(
                f"no store: pass store=... (YAML, serve args, --store) or set ${ENV_STORE}"
            )
        if self.image_queries and (problem := model_error(self.model)) is not None:
            raise ConfigError(problem)
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if not 1 <= self.default_k <= MAX_K:
            raise ConfigError(f"default_k must be in 1..{MAX_K}, got {self.default_k}")
        if self.shards_per_group is not None and self.shards_per_group < 1:
            raise ConfigError(f"shards_per_group must be >= 1, got {self.shards_per_group}")
        if self.search_batch_wait_ms < 0:
            raise ConfigError("search_batch_wait_ms must be >= 0")
        for name in (
            "search_max_batch",
            "search_parallel_shards",
            "max_batch_size",
            "search_threads",
            "max_nprobe",
            "max_candidates",
            "max_upload_bytes",
            "max_pixels",
            "anon_max_nprobe",
            "anon_max_candidates",
            "anon_max_pixels",
            "anon_max_k",
            "anon_max_filter_nodes",
            "anon_max_shape_pool",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_nprobe is not None and not 1 <= self.default_nprobe <= self.max_nprobe:
            raise ConfigError(f"default_nprobe must be in 1..max_nprobe, got {self.default_nprobe}")
        if self.default_candidates is not None and not (
            1 <= self.default_candidates <= self.max_candidates
        ):
            raise ConfigError(
                f"default_candidates must be in 1..max_candidates, got {self.default_candidates}"
            )
        for name in ("shard_deadline_ms", "embed_deadline_ms", "needed_shard_deadline_ms"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.needed_shard_deadline_ms < self.shard_deadline_ms:
            raise ConfigError(
                f"needed_shard_deadline_ms ({self.needed_shard_deadline_ms}) must be at least "
                f"shard_deadline_ms ({self.shard_deadline_ms})"
            )
        if self.open_writes and self.api_key:
            raise ConfigError(
                "open_writes: true opens writes to anyone, but an api_key is set too: "
                "keep the key (writes need it) or drop it (writes open to all), not both"
            )
        if not isinstance(self.thumbnail_roots, list):
            raise ConfigError("thumbnail_roots must be a list of directories or URI prefixes")
        self.thumbnail_roots = [thumbnail_root(root) for root in self.thumbnail_roots]
        if self.thumbnail_timeout_s <= 0:
            raise ConfigError(f"thumbnail_timeout_s must be > 0, got {self.thumbnail_timeout_s}")
        if self.handle_transport not in ("ray", "grpc"):
            raise ConfigError(
                f"handle_transport must be 'ray' or 'grpc', got {self.handle_transport!r}"
            )
        if self.log_encoding not in ("JSON", "TEXT"):
            raise ConfigError(f"log_encoding must be 'JSON' or 'TEXT', got {self.log_encoding!r}")
        if self.batch_wait_timeout_s < 0 or self.reload_interval_s < 0:
            raise ConfigError("batch_wait_timeout_s and reload_interval_s must be >= 0")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options must be a mapping of fsspec options")
        if self.lease_interval_s <= 0 or self.lease_ttl_s < 2 * self.lease_interval_s:
            raise ConfigError("need lease_interval_s > 0 and lease_ttl_s >= 2 x lease_interval_s")
        names = ("delta_poll_s", "rebuild_delta_rows", "rebuild_check_s", "rebuild_gc_grace_s")
        names = (*names, "rebuild_delta_parts")
        names = (*names, "poll_idle_after_s", "delta_poll_idle_max_s", "reload_idle_max_s")
        for name in (*names, "rebuild_num_cpus", "clock_skew_ms", "verify_budget_ms"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.rebuild_delta_fraction <= 1:
            raise ConfigError(
                f"rebuild_delta_fraction must be in 0..1, got {self.rebuild_delta_fraction}"
            )
        if not 0 <= self.canary_fraction <= 1:
            raise ConfigError(f"canary_fraction must be in 0..1, got {self.canary_fraction}")
        if self.shutdown_wait_s <= 0:
            raise ConfigError(f"shutdown_wait_s must be > 0, got {self.shutdown_wait_s}")
        if self.canary_max_per_s <= 0 or self.canary_num_cpus < 0:
            raise ConfigError("canary_max_per_s must be > 0 and canary_num_cpus >= 0")
        if self.canary_window < 1 or self.canary_queue < 1:
            raise ConfigError("canary_window and canary_queue must be >= 1")
        if self.rebuild_threads < 1:
            raise ConfigError(f"rebuild_threads must be >= 1, got {self.rebuild_threads}")
        from index.units import parse_bytes

        for name in ("rebuild_memory_budget", "rebuild_delta_bytes"):
            try:
                parse_bytes(getattr(self, name))
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
        self.ingress.validate("ingress")
        self.embedder.validate("embedder")
        self.searcher.validate("searcher")
        return self

    # ---- readers ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ServeConfig:
        data = dict(data or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown serve config keys: {', '.join(unknown)}")
        values = {}
        for key, value in data.items():
            if key in ("ingress", "embedder", "searcher"):
                values[key] = _settings_from_dict(key, value or {})
            else:
                values[key] = _coerce(key, value, known[key].type)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ServeConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data)

    @classmethod
    def from_env(cls, **overrides: Any) -> ServeConfig:
        """``$VISUAL_SEARCH_SERVE_CONFIG`` (YAML) if set, then ``overrides``, then the env store."""
        path = os.environ.get(ENV_CONFIG)
        base = yaml.safe_load(Path(path).read_text()) if path else {}
        return cls.from_dict({**(base or {}), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# object stores a thumbnail may be read from (with the server's own credentials, under the
# prefixes the operator names); web and shell-like schemes (http, ftp, sftp, ...) never: a fetch
# from the server's network position is SSRF, and an address check cannot outrun DNS rebinding
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
SYSTEM_DIRS = ("/dev", "/proc", "/sys", "/run")
_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


def thumbnail_root(text: Any) -> str:
    """One ``thumbnail_roots`` entry normalised (a local directory: an absolute path, symlinks
    resolved where the replica reads; an object-store prefix: ``scheme://bucket/prefix/``), or
    ConfigError: relative paths, ``/``, ``SYSTEM_DIRS``, other schemes, ``::``, ``.``/``..``."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"thumbnail_roots: {text!r} is not a directory or URI prefix")
    text = text.strip()
    match = _URI.match(text)
    if match and match.group(1).lower() != "file":
        scheme, rest = match.group(1).lower(), match.group(2).strip("/")
        if scheme not in OBJECT_STORE_SCHEMES:
            raise ConfigError(
                f"thumbnail_roots: {text!r}: only local directories and object-store prefixes "
                f"({', '.join(sorted(OBJECT_STORE_SCHEMES))}) can be roots, never {scheme}://"
            )
        parts = rest.split("/")
        if not rest or "::" in text or any(p in ("", ".", "..") for p in parts):
            raise ConfigError(f"thumbnail_roots: {text!r} is not a plain scheme://bucket/prefix")
        return f"{scheme}://{rest}/"
    path = text[len("file://") :] if match else text
    if not path.startswith("/"):
        raise ConfigError(f"thumbnail_roots: {text!r} is not an absolute path")
    path = os.path.normpath(path)
    if path in ("/", "//") or any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS):
        raise ConfigError(f"thumbnail_roots: {text!r} would open the whole or a system tree")
    return path


def _settings_from_dict(name: str, value: Any) -> DeploymentSettings:
    """Deployment settings over that deployment's defaults (unknown keys refused)."""
    if isinstance(value, DeploymentSettings):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping of deployment settings")
    base = {
        "ingress": _ingress_defaults,
        "embedder": _embedder_defaults,
        "searcher": _searcher_defaults,
    }[name]()
    known = {f.name: f for f in dataclasses.fields(DeploymentSettings)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"unknown {name} settings: {', '.join(unknown)}")
    for key, raw in value.items():
        setattr(base, key, _coerce(f"{name}.{key}", raw, known[key].type))
    return base


def _coerce(name: str, value: Any, type_text: Any) -> Any:
    """Strings from ``serve run ... key=value`` or env become the field's declared type."""
    if value is None or not isinstance(value, str):
        return value
    type_text = str(type_text)
    if type_text.startswith("list"):  # a JSON list, or comma-separated
        import json

        if value.strip().startswith("["):
            try:
                return list(json.loads(value))
            except ValueError:
                raise ConfigError(f"{name}: cannot read {value!r} as a JSON list") from None
        return [part.strip() for part in value.split(",") if part.strip()]
    if type_text.startswith("dict"):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"{name}: cannot read {value!r} as a JSON object") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a JSON object")
        return value
    try:
        if type_text.startswith("bool"):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if type_text.startswith("int"):
            return None if value.lower() == "none" else int(value)
        if type_text.startswith("float | str"):
            return value if value == "auto" else float(value)
        if type_text.startswith("float"):
            return float(value)
    except ValueError:
        raise ConfigError(f"{name}: cannot read {value!r} as {type_text}") from None
    return value
