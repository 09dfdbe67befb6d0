"""Every Ray cluster YAML in the repository passes Ray's own checks offline, so a typo fails CI.

`ray up` has no dry run. Before it touches a cloud it loads the YAML and runs
``ray.autoscaler._private.util.prepare_config`` (merge with the provider's defaults.yaml, the
on-prem rewrite for ``provider: local``, docker checks, per-type min/max workers) and then
``validate_config`` (Ray's JSON schema, head type, sum of min_workers). This test calls exactly
those two. It skips what needs the network and credentials: the provider's ``bootstrap_config``
(AWS: IAM profile, key pair, subnets, security groups over boto3) and the AWS instance-type
resource autodetection; boto3 is not even imported.

On top of Ray's checks, the project's own: the node types advertise the resources the code
places work with (``GPU`` for embedding, ``shard_host`` for shard searchers), min/max workers
are sane, labels follow Ray's syntax, every shell command parses, the repository is synced and
installed the README's way, and whatever a serve config in ``serve/`` asks for fits a node type.
Negative tests prove each layer rejects a broken config. ``cluster-fake.yaml`` (the same cluster
for Ray's fake multi-node provider, run for real by ``test_fake_cluster.py``) is checked to stay
``cluster.yaml`` in small: same worker types, resources, labels and min workers.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.local import LOG_BUFFER

ROOT = Path(__file__).resolve().parents[1]
REMOTE_REPO = "~/visual-search"  # where file_mounts put the repository on every node
SHARD_RESOURCE = "shard_host"  # custom resource of the memory nodes; ShardSearcher asks for 1
EXPECTED_CONFIGS = {"cluster.yaml", "cluster-local.yaml", "cluster-fake.yaml"}
FAKE_HEAD = "ray.head.default"  # the fake provider's name for the head it was started from
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
CLUSTER_KEYS = {"provider", "available_node_types", "head_node_type"}


# ---- discovery
def cluster_config_paths() -> list[Path]:
    """Cluster YAMLs: in the repository root (named cluster* or shaped like one) and cluster*/."""
    found = set()
    for pattern in ("*.yaml", "*.yml"):
        for path in ROOT.glob(pattern):
            if path.name.startswith("cluster") or _looks_like_cluster(path):
                found.add(path)
        for folder in ROOT.glob("cluster*/"):
            found.update(p for p in folder.rglob(pattern) if p.is_file())
    return sorted(found)


def _looks_like_cluster(path: Path) -> bool:
    try:
        body = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(body, dict) and bool(CLUSTER_KEYS & set(body))


def load(path: Path) -> dict[str, Any]:
    body = yaml.safe_load(path.read_text())
    assert isinstance(body, dict), f"{path.name}: the top level must be a mapping"
    return body


CONFIGS = cluster_config_paths()
IDS = [str(p.relative_to(ROOT)) for p in CONFIGS]


# ---- Ray's own checks
def ray_prepare_and_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does to a config before it contacts the provider; returns the prepared one.

    Raises what Ray raises: jsonschema.ValidationError (schema), ValueError (head type, min
    workers), TypeError (some wrong types surface as that), click.ClickException (on-prem
    aborts), NotImplementedError (unknown provider).
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    if config.get("provider", {}).get("type") == "fake_multinode":
        # the wheel lacks this provider's defaults file, which prepare_config merges in; the
        # fake config is complete without it (what `ray start --autoscaling-config` reads)
        validate_config(copy.deepcopy(config))
        return copy.deepcopy(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def rejected_by_ray(config: dict[str, Any]) -> BaseException | None:
    import click
    import jsonschema

    try:
        ray_prepare_and_validate(config)
    except (
        jsonschema.ValidationError,
        ValueError,
        TypeError,
        KeyError,
        NotImplementedError,
        click.ClickException,
    ) as e:
        return e
    return None


# ---- the project's checks
def placement_problems(raw: dict[str, Any], prepared: dict[str, Any]) -> list[str]:
    """What would make work land in the wrong place or never start; empty when all is well."""
    from ray._private.label_utils import validate_node_label_syntax

    problems: list[str] = []
    if raw["provider"]["type"] == "local":
        return problems  # one node type; roles come from `ray start --resources` (below)
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    global_max = prepared["max_workers"]
    for name, node in types.items():
        res = node["resources"]
        low, high = node["min_workers"], node["max_workers"]
        if name == head:
            if high != 0:
                problems.append(f"{name}: the head type must have max_workers 0, got {high}")
            if res.get("GPU", 0) or res.get(SHARD_RESOURCE, 0):
                problems.append(f"{name}: the head must not advertise GPU or {SHARD_RESOURCE}")
        elif not 0 <= low <= high <= global_max:
            problems.append(f"{name}: need 0 <= min ({low}) <= max ({high}) <= {global_max}")
        elif high < 1:
            problems.append(f"{name}: max_workers {high} means it never launches")
        try:
            validate_node_label_syntax(node.get("labels") or {})
        except ValueError as e:
            problems.append(f"{name}: {e}")
        if raw["provider"]["type"] == "aws":
            for key in ("InstanceType", "ImageId"):
                if not node["node_config"].get(key):
                    problems.append(f"{name}: node_config needs {key} (no silent default AMI)")
            if "CPU" not in res:
                problems.append(f"{name}: say CPU explicitly (autodetection needs AWS access)")
    workers = {n: t for n, t in types.items() if n != head}
    if not any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()):
        problems.append("no worker type advertises GPU: embedding actors have nowhere to go")
    if not any(t["resources"].get(SHARD_RESOURCE, 0) >= 1 for t in workers.values()):
        problems.append(f"no worker type advertises {SHARD_RESOURCE}: shard replicas never place")
    for name, t in workers.items():
        if t["resources"].get("GPU", 0) and t["resources"].get(SHARD_RESOURCE, 0):
            problems.append(f"{name}: GPU and {SHARD_RESOURCE} on one type mixes the two roles")
    if raw["provider"]["type"] == "aws":
        region = raw["provider"].get("region", "")
        if not region:
            problems.append("provider.region is missing (a typo there is not a schema error)")
        for zone in filter(None, raw["provider"].get("availability_zone", "").split(",")):
            if not zone.strip().startswith(region):
                problems.append(f"availability zone {zone!r} is not in region {region!r}")
    return problems


def install_problems(raw: dict[str, Any]) -> list[str]:
    """The repository must reach the nodes and be installed into the Python that Ray runs."""
    problems: list[str] = []
    if raw["provider"]["type"] == "fake_multinode":
        return problems  # its nodes are processes of this checkout on this machine
    local = (raw.get("file_mounts") or {}).get(REMOTE_REPO)
    if local is None:
        problems.append(f"file_mounts must sync the repository to {REMOTE_REPO}")
    elif not (ROOT / local / "pyproject.toml").is_file():
        problems.append(f"file_mounts source {local!r} is not the repository (run from its root)")
    if ".gitignore" not in (raw.get("rsync_filter") or []):
        problems.append("rsync_filter should hold .gitignore so .venv and stores are not copied")
    setup = " ; ".join(raw.get("setup_commands") or [])
    if raw["provider"]["type"] == "local":
        if "scripts/bootstrap.sh" not in setup:
            problems.append("on-prem setup should run scripts/bootstrap.sh (the README's way)")
        starts = raw.get("head_start_ray_commands", []) + raw.get("worker_start_ray_commands", [])
        if not all(".venv/bin/ray" in c for c in starts):
            problems.append("on-prem Ray must start from the project's .venv")
    elif not re.search(rf"pip install .*-e {re.escape(REMOTE_REPO)}", setup):
        problems.append(f"setup_commands must `pip install -e {REMOTE_REPO}` into Ray's Python")
    if "s3fs" not in setup:
        problems.append("setup_commands must install s3fs for an s3:// store")
    return problems


def all_commands(raw: dict[str, Any]) -> list[str]:
    commands = [c for key in COMMAND_KEYS for c in raw.get(key) or []]
    for node in (raw.get("available_node_types") or {}).values():
        for key in ("initialization_commands", "worker_setup_commands"):
            commands += node.get(key) or []
    return commands


# ---- tests: every config
def test_the_cluster_configs_are_found():
    assert EXPECTED_CONFIGS <= {p.name for p in CONFIGS}, IDS


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_ray_accepts_config(path):
    ray_prepare_and_validate(load(path))


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_placement_and_worker_bounds(path):
    raw = load(path)
    assert placement_problems(raw, ray_prepare_and_validate(raw)) == []


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_repository_is_synced_and_installed(path):
    assert install_problems(load(path)) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_every_shell_command_parses(path):
    for command in all_commands(load(path)):
        done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert done.returncode == 0, f"{command!r}: {done.stderr}"


def test_on_prem_resources_file_reaches_ray_start(tmp_path):
    """cluster-local.yaml: a box's JSON file becomes `ray start --resources`, '{}' without one."""
    raw = load(ROOT / "cluster-local.yaml")
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    fragments = [m.group(0) for c in starts for m in re.finditer(r'--resources="[^"]*\)"', c)]
    assert len(fragments) == 2, starts  # head and workers both read it
    spec = tmp_path / "ray-resources.json"
    for fragment in fragments:
        args = fragment.replace("/etc/visual-search/ray-resources.json", str(spec))
        for content, expected in ((None, {}), ('{"shard_host": 8}', {SHARD_RESOURCE: 8})):
            spec.unlink(missing_ok=True)
            if content is not None:
                spec.write_text(content + "\n")
            out = subprocess.run(
                ["bash", "-c", f"printf '%s' {args}"], capture_output=True, text=True, check=True
            ).stdout
            assert out.startswith("--resources=")
            assert json.loads(out.removeprefix("--resources=")) == expected


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_ray_starts_with_serves_throughput_mode_and_haproxy(name, tmp_path):
    """Every node's `ray start` sees the flags of Serve's HAProxy throughput mode (the measured
    winner, serve/local.py) and its request-log batch (``LOG_BUFFER``, as the local modes set it):
    run each start command with a stub `ray` that prints them."""
    raw = load(ROOT / name)
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    starts = [c for c in starts if re.search(r"\bray start\b", c)]
    assert len(starts) == 2, starts  # the head and the workers
    stub = tmp_path / "visual-search" / ".venv" / "bin" / "ray"
    stub.parent.mkdir(parents=True)
    stub.write_text(
        '#!/bin/sh\necho "$RAY_SERVE_THROUGHPUT_OPTIMIZED $RAY_SERVE_ENABLE_HA_PROXY'
        ' $RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"\n'
    )
    stub.chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": f"{stub.parent}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.1"}
    for command in starts:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["1", "1", LOG_BUFFER], (command, done.stdout)


def test_fake_cluster_is_cluster_yaml_in_small():
    """cluster-fake.yaml keeps cluster.yaml's node types, resources, labels and min workers,
    sized for one 2-core, 24 GiB machine (logical CPUs; small object stores and max_workers)."""
    real, fake = load(ROOT / "cluster.yaml"), load(ROOT / "cluster-fake.yaml")
    real_types, fake_types = real["available_node_types"], fake["available_node_types"]
    assert fake["head_node_type"] == FAKE_HEAD and real["head_node_type"] in real_types
    heads = real_types[real["head_node_type"]], fake_types[FAKE_HEAD]
    assert heads[0]["resources"] == heads[1]["resources"] == {"CPU": 0}
    assert heads[0].get("labels") == heads[1].get("labels")
    workers = set(real_types) - {real["head_node_type"]}
    assert set(fake_types) - {FAKE_HEAD} == workers
    for name in workers:
        r, f = real_types[name], fake_types[name]
        fake_resources = {k: v for k, v in f["resources"].items() if k != "object_store_memory"}
        assert set(fake_resources) == set(r["resources"]), name
        assert all(v >= 1 for v in fake_resources.values()), name  # each role still there
        assert f.get("labels") == r.get("labels"), name
        assert f["min_workers"] == r["min_workers"], name
        assert 1 <= f["max_workers"] <= r["max_workers"], name
    assert fake["max_workers"] <= real["max_workers"]
    assert fake["idle_timeout_minutes"] <= real["idle_timeout_minutes"]
    # what fits one machine: every worker at once, each with its object store
    most = sum(fake_types[n]["max_workers"] for n in workers)
    assert most <= fake["max_workers"] <= 6
    stores = sum(fake_types[n]["max_workers"] * fake_types[n]["resources"]["object_store_memory"]
                 for n in workers)  # fmt: skip
    assert stores <= 2 * 2**30


# ---- tests: serve configs against the cluster
def resource_requests(node: Any) -> list[dict[str, float]]:
    """Every actor bundle a serve config asks for: Serve's ray_actor_options and the project's
    per-deployment settings alike (any mapping with num_cpus / num_gpus / resources)."""
    found: list[dict[str, float]] = []
    if isinstance(node, dict):
        if {"num_cpus", "num_gpus", "resources"} & set(node):
            bundle = {str(k): float(v) for k, v in (node.get("resources") or {}).items()}
            for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
                if isinstance(node.get(key), (int, float)) and node[key] > 0:
                    bundle[name] = float(node[key])  # "auto" GPUs decide at run time
            found.append(bundle)
        for value in node.values():
            found += resource_requests(value)
    elif isinstance(node, list):
        for value in node:
            found += resource_requests(value)
    return found


def unplaceable(bundles: list[dict[str, float]], prepared: dict[str, Any]) -> list[dict]:
    types = prepared["available_node_types"].values()
    return [
        b
        for b in bundles
        if not any(all(t["resources"].get(k, 0) >= v for k, v in b.items()) for t in types)
    ]


SERVE_CONFIGS = sorted((ROOT / "serve").glob("*.yaml"))


@pytest.mark.skipif(not SERVE_CONFIGS, reason="no serve/*.yaml yet")
@pytest.mark.parametrize("serve_path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_requests_fit_a_node_type(serve_path):
    prepared = ray_prepare_and_validate(load(ROOT / "cluster.yaml"))
    bundles = resource_requests(yaml.safe_load(serve_path.read_text()))
    assert unplaceable(bundles, prepared) == []


# ---- tests: each layer rejects a broken config
def _mutate(path: str, edit) -> dict[str, Any]:
    config = copy.deepcopy(load(ROOT / path))
    edit(config)
    return config


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _set(mapping: dict, key: str, value: Any) -> None:
    mapping[key] = value


def _nodes(config: dict) -> dict:
    return config["available_node_types"]


RAY_REJECTS = {
    "top-level key typo": (
        "cluster.yaml",
        lambda c: _rename(c, "max_workers", "max_worker"),
        "max_worker",
    ),
    "node type key typo": (
        "cluster.yaml",
        lambda c: _rename(_nodes(c)["shard_worker"], "resources", "resource"),
        "resources",
    ),
    "docker key typo": ("cluster.yaml", lambda c: _set(c["docker"], "imgae", "x"), "imgae"),
    "max_workers as a string": ("cluster.yaml", lambda c: _set(c, "max_workers", "24"), "24"),
    "fractional custom resource": (
        "cluster.yaml",
        lambda c: _set(_nodes(c)["shard_worker"]["resources"], SHARD_RESOURCE, 8.5),
        "8.5",
    ),
    "setup_commands as a string (a plain TypeError in Ray)": (
        "cluster.yaml",
        lambda c: _set(c, "setup_commands", "pip install x"),
        "concatenate",
    ),
    "unknown head type": ("cluster.yaml", lambda c: _set(c, "head_node_type", "haed"), "head"),
    "min_workers above the global max": (
        "cluster.yaml",
        lambda c: _set(_nodes(c)["gpu_worker"], "min_workers", 99),
        "max_workers",
    ),
    "on-prem without worker_ips": (
        "cluster-local.yaml",
        lambda c: c["provider"].pop("worker_ips"),
        "worker_ips",
    ),
    "on-prem auth key typo": (
        "cluster-local.yaml",
        lambda c: _rename(c["auth"], "ssh_user", "ssh_usr"),
        "ssh_usr",
    ),
}


@pytest.mark.parametrize("case", list(RAY_REJECTS))
def test_ray_rejects_broken_config(case):
    path, edit, mentioned = RAY_REJECTS[case]
    error = rejected_by_ray(_mutate(path, edit))
    assert error is not None, f"{case}: Ray accepted it"
    assert mentioned in str(error), f"{case}: {error!r}"


PROJECT_REJECTS = {
    "shard nodes lose shard_host": (
        lambda c: _nodes(c)["shard_worker"]["resources"].pop(SHARD_RESOURCE),
        SHARD_RESOURCE,
    ),
    "GPU nodes lose their GPU": (
        lambda c: _nodes(c)["gpu_worker"]["resources"].pop("GPU"),
        "GPU",
    ),
    "head advertises shard_host": (
        lambda c: _set(_nodes(c)["head"]["resources"], SHARD_RESOURCE, 1),
        "head",
    ),
    "a worker type that never launches": (
        lambda c: _set(_nodes(c)["gpu_worker"], "max_workers", 0),
        "never launches",
    ),
    "min above max": (lambda c: _set(_nodes(c)["shard_worker"], "min_workers", 17), "min"),
    "provider region typo": (lambda c: _rename(c["provider"], "region", "regoin"), "region"),
    "label key with a space": (
        lambda c: _set(_nodes(c)["gpu_worker"], "labels", {"bad key": "x"}),
        "bad key",
    ),
}


@pytest.mark.parametrize("case", list(PROJECT_REJECTS))
def test_project_checks_reject_broken_placement(case):
    edit, mentioned = PROJECT_REJECTS[case]
    config = _mutate("cluster.yaml", edit)
    problems = placement_problems(config, ray_prepare_and_validate(config))
    assert any(mentioned in p for p in problems), f"{case}: {problems}"


def test_install_check_rejects_a_config_without_the_project():
    config = _mutate("cluster.yaml", lambda c: _set(c, "setup_commands", ["pip install s3fs"]))
    assert any("pip install -e" in p for p in install_problems(config))


def test_serve_check_rejects_an_unknown_resource():
    prepared = ray_prepare_and_validate(load(ROOT / "cluster.yaml"))
    asks = resource_requests({"searcher": {"num_cpus": 2, "resources": {"shard_hots": 1}}})
    assert unplaceable(asks, prepared) == [{"shard_hots": 1.0, "CPU": 2.0}]
    fits = resource_requests({"ray_actor_options": {"num_cpus": 2, "resources": {"shard_host": 1}}})
    assert unplaceable(fits, prepared) == []
