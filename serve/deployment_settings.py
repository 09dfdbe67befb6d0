"""Replicas and resources of one deployment, and the error every setting raises.

Its own module so ``serve.config`` (every other setting) stays one screen per section; re-exported
from ``serve.config``, where callers import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


@dataclass
class DeploymentSettings:
    """Replicas and resources of one deployment (for ShardSearcher: of each shard's deployment).

    ``num_replicas`` is fixed unless ``max_replicas`` is set, which turns on Serve's autoscaling
    between ``min_replicas`` and ``max_replicas`` (target ``target_ongoing_requests`` per replica).
    ``num_gpus``: a number, or ``"auto"`` = 1 when the cluster has a GPU at build time, else 0.
    """

    num_replicas: int = 1
    num_cpus: float = 0.25
    num_gpus: float | str = 0
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 32
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    # custom Ray resources each replica needs, e.g. {"shard_host": 1} so shard replicas land on
    # the memory-heavy nodes of cluster.yaml (the node type advertises the resource)
    resources: dict[str, float] = field(default_factory=dict)

    def validate(self, name: str) -> None:
        if self.num_replicas < 1:
            raise ConfigError(f"{name}.num_replicas must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0:
            raise ConfigError(f"{name}.num_cpus must be >= 0, got {self.num_cpus}")
        if isinstance(self.num_gpus, str):
            if self.num_gpus != "auto":
                raise ConfigError(f"{name}.num_gpus must be a number or 'auto'")
        elif self.num_gpus < 0:
            raise ConfigError(f"{name}.num_gpus must be >= 0, got {self.num_gpus}")
        if self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            if not 0 <= low <= self.max_replicas or self.max_replicas < 1:
                raise ConfigError(
                    f"{name}: need 0 <= min_replicas ({low}) <= max_replicas "
                    f"({self.max_replicas}) and max_replicas >= 1"
                )
        elif self.min_replicas is not None:
            raise ConfigError(f"{name}.min_replicas needs max_replicas (autoscaling bounds)")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"{name}.max_ongoing_requests must be >= 1")
        if self.health_check_period_s <= 0 or self.health_check_timeout_s <= 0:
            raise ConfigError(f"{name}: health check period and timeout must be > 0")
        if not isinstance(self.resources, dict):
            raise ConfigError(f"{name}.resources must be a mapping of resource name to amount")
        for key, amount in self.resources.items():
            if key in ("CPU", "GPU", "memory"):
                raise ConfigError(f"{name}.resources: set {key} with num_cpus/num_gpus, not here")
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
                raise ConfigError(f"{name}.resources[{key!r}] must be a number >= 0: {amount!r}")

    def resolved_gpus(self, cluster_gpus: float) -> float:
        if self.num_gpus == "auto":
            return 1.0 if cluster_gpus >= 1 else 0.0
        return float(self.num_gpus)

    def deployment_options(self, cluster_gpus: float = 0.0, slots: int = 1) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options(...)``. ``slots``: how many units of the
        custom ``resources`` each replica takes (a searcher of a group of N shards takes N
        ``shard_host`` slots, as N one-shard replicas did)."""
        resources = {k: v * slots for k, v in self.resources.items()}
        options: dict[str, Any] = {
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.resolved_gpus(cluster_gpus),
                **({"resources": resources} if resources else {}),
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            options["autoscaling_config"] = {
                "min_replicas": low,
                "initial_replicas": max(low, min(self.num_replicas, self.max_replicas)),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.num_replicas
        return options
