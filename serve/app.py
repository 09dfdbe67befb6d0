"""Compose the Serve graph: Ingress -> QueryEmbedder, Ingress -> ShardSearcher0..G-1.

``ShardSearcher{g}`` serves group ``g`` of the shards (``shard_groups``: ``shards_per_group``
consecutive shards each; by default all shards in one group). ``RecallCanary``
(``serve.deployments.canary``, when ``canary_fraction`` > 0) recomputes sampled answers exactly in
the background. The deployments live in ``serve.deployments``; below them, in floors that import
only downward: ``serve.planner`` and ``serve.writes`` (plain classes), ``serve.catalog``,
``serve.http`` (the HTTP API without Serve), and ``serve.scatter``, ``serve.metrics``,
``serve.config``.

Three ways in, one builder:

- Python: ``serve.run(build_app(ServeConfig(store=...)))``.
- ``serve run serve.app:app`` with ``VISUAL_SEARCH_STORE`` (and optionally
  ``VISUAL_SEARCH_SERVE_CONFIG``, a YAML in ``ServeConfig``'s schema) in the environment;
  ``serve run serve.app:app_builder store=/path/to/store k=v ...`` passes arguments instead.
- ``serve deploy serve/serve_config.yaml``: ``import_path: serve.app:app_builder`` with ``args``.

The number of shards, the dimension and the model come from the store's manifest, read here once:
a query model that differs from the catalogue's is refused before anything is deployed.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from embedding.config import canonical_model_name
from index.storage.manifest import Manifest, load_manifest
from serve.config import ConfigError, ServeConfig
from serve.deployments.canary import RecallCanary
from serve.deployments.embedder import ModelMismatch, QueryEmbedder, check_model
from serve.deployments.ingress import Ingress
from serve.deployments.rebuilder import Rebuilder
from serve.deployments.searcher import ShardSearcher, searcher_args


def load_store_manifest(config: ServeConfig) -> Manifest:
    manifest = load_manifest(config.open_store())
    if manifest is None:
        raise ConfigError(
            f"store {config.store!r} has no manifest: embed a collection into it first "
            "(python -m pipelines.embed --input DIR --store ROOT) and build its indexes"
        )
    return manifest


def check_model_config(config: ServeConfig, manifest: Manifest) -> None:
    """Refuse, before deploying, a query model other than the one that embedded the catalogue.

    The name is compared at once; the weights tag needs the backbone loaded (it names the weights
    by their file or content), which is done here too unless ``weights`` already disagrees with
    an obviously different tag. The embedder replica checks again, with the dimension.
    """
    if canonical_model_name(config.model) != manifest.model:
        raise ModelMismatch(
            f"serve config model {config.model!r} differs from the catalogue's "
            f"{manifest.model_tag!r}; set model: {manifest.model} (and its weights)"
        )
    from embedding.backbones import load_backbone

    backbone = load_backbone(config.model, config.weights, config.embed_threads)
    check_model(backbone.name, backbone.weights_tag, None, {**_expected(manifest), "dim": None})


def _expected(manifest: Manifest) -> dict[str, Any]:
    return {"model": manifest.model, "weights": manifest.weights, "dim": manifest.dim}


def shard_groups(num_shards: int, per_group: int | None) -> list[list[int]]:
    """Consecutive shards, ``per_group`` to a group (None: all in one)."""
    size = num_shards if per_group is None else max(1, per_group)
    return [
        list(range(start, min(num_shards, start + size))) for start in range(0, num_shards, size)
    ]


def _cluster_gpus() -> float:
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def build_app(config: ServeConfig | dict[str, Any], *, verify_model: bool = True) -> Application:
    """The application for ``config``; nothing is deployed until ``serve.run``/``serve deploy``."""
    if isinstance(config, dict):
        config = ServeConfig.from_dict(config)
    config.validate()
    manifest = load_store_manifest(config)
    gpus = _cluster_gpus()
    common = {  # every deployment's: its logs, and how it stops
        "logging_config": {"enable_access_log": config.access_log, "encoding": config.log_encoding},
        "graceful_shutdown_wait_loop_s": config.shutdown_wait_s,
    }
    embedder = None
    if config.image_queries:
        if verify_model:
            check_model_config(config, manifest)
        options = {**config.embedder.deployment_options(gpus), **common}
        embedder = QueryEmbedder.options(**options).bind(
            config.model_config,
            _expected(manifest),
            config.max_batch_size,
            config.batch_wait_timeout_s,
        )
    groups = shard_groups(manifest.num_shards, config.shards_per_group)
    searchers = [
        ShardSearcher.options(
            name=f"ShardSearcher{g}",
            **config.searcher.deployment_options(gpus, slots=len(shards)),
            **common,
        ).bind(*searcher_args(config, shards))
        for g, shards in enumerate(groups)
        if not config.colocate_shards  # else the ingress searches them itself (LocalGroup)
    ]
    # one replica decides rebuilds (serve.deployments.rebuilder); none for a read-only app
    rebuilder = Rebuilder.options(**common).bind(config) if config.writes else None
    canary = None
    # the live recall canary (serve.deployments.canary) asks the group deployments for exact
    # answers; an app whose ingress searches the groups itself (colocate_shards) runs without it
    if config.canary_fraction > 0 and not config.colocate_shards:
        canary = RecallCanary.options(
            ray_actor_options={"num_cpus": config.canary_num_cpus}, **common
        ).bind(
            searchers,
            manifest.metric,
            config.canary_window,
            config.canary_max_per_s,
            config.canary_queue,
        )
    # the ingress's own line per request is its access log (serve.metrics): not Serve's too
    ingress_logs = {"enable_access_log": False, "encoding": config.log_encoding}
    ingress = {**config.ingress.deployment_options(gpus), **common, "logging_config": ingress_logs}
    return Ingress.options(**ingress).bind(config, embedder, searchers, rebuilder, groups, canary)


def config_from_args(args: dict[str, Any] | None) -> ServeConfig:
    """``ServeConfig`` fields in ``args`` over the environment's config (``from_env``); nested
    deployment settings (``ingress``, ``embedder``, ``searcher``) merge key by key."""
    base = ServeConfig.from_env().to_dict()
    args = dict(args or {})
    for name in ("ingress", "embedder", "searcher"):
        if name in args:
            args[name] = {**base[name], **(args[name] or {})}
    return ServeConfig.from_dict({**base, **args})


def app_builder(args: dict[str, Any]) -> Application:
    """For ``serve deploy`` (``import_path: serve.app:app_builder`` + ``args``) and
    ``serve run serve.app:app_builder store=... key=value``: args are ``ServeConfig`` fields."""
    return build_app(config_from_args(args))


def __getattr__(name: str) -> Any:
    """``serve.app:app`` is built on first access, from the environment (no import-time I/O)."""
    if name == "app":
        return build_app(ServeConfig.from_env())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
