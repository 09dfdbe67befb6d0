"""The KubeRay manifests in deploy/kuberay/ are valid for KubeRay and say what cluster.yaml and
serve/serve_config.yaml say, checked offline.

No Kubernetes cluster runs on the machines this project is developed on, so these checks are
all the manifests get; each layer has negative tests that prove it can fail:

1. KubeRay's own CRD schemas (``tests/specs/kuberay/``, KubeRay v1.7.0, ``ray.io/v1``), adapted
   from Kubernetes' OpenAPI dialect to JSON Schema: ``x-kubernetes-int-or-string`` is integer or
   string, ``nullable`` admits null, and an unknown field is an error, as ``kubectl apply``'s
   strict field validation makes it (KubeRay's few CEL rules are not evaluated).
2. What Ray's autoscaler reads from each cluster spec, derived by Ray's own KubeRay code
   (``_derive_autoscaling_config_from_ray_cr``, which also runs Ray's config schema): node types
   with cluster.yaml's resources (custom ``shard_host`` included), labels and worker bounds, its
   idle timeout and upscaling speed.
3. The pods and the apps: cluster.yaml's image, setup command and env per node type, the Secrets
   for the API key and the AWS keys, node selectors naming cluster.yaml's instance types and
   pods that fit them; the RayService's Serve config is serve_config.yaml's application with the
   cluster settings of docs/cluster.md, accepted by Serve's schema and the app's ServeConfig,
   and each deployment fits a worker group; the jobs' entrypoints parse with the pipelines' own
   argument parsers and ask for the node types their groups provide.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from serve.config import ENV_API_KEY, ServeConfig

ROOT = Path(__file__).resolve().parents[1]
KUBERAY_DIR = ROOT / "deploy" / "kuberay"
SPECS = ROOT / "tests" / "specs" / "kuberay"
EXPECTED_MANIFESTS = {"rayservice.yaml", "rayjob-embed.yaml", "rayjob-build.yaml"}
MANIFESTS = sorted(KUBERAY_DIR.glob("*.yaml"))
IDS = [p.name for p in MANIFESTS]
API_VERSION = "ray.io/v1"
CLUSTER_KEY = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}
HEAD_GROUP = "headgroup"  # Ray's autoscaler's name for a KubeRay head group
REPO_IN_POD = "/home/ray/visual-search"  # ~/visual-search (cluster.yaml's) in rayproject/ray
SOURCE_ARCHIVE = "/etc/visual-search/src/visual-search.tar.gz"  # the ConfigMap, mounted
INSTANCE_LABEL = "node.kubernetes.io/instance-type"
# vCPUs and GiB of cluster.yaml's instance types (AWS's sizes): a pod asking for more never runs
INSTANCE_SIZES = {"m6i.xlarge": (4, 16), "g5.4xlarge": (16, 64), "r6id.4xlarge": (16, 128)}
GPU_LIMIT = "nvidia.com/gpu"
AWS_SECRETS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
REGION_ENV = "AWS_DEFAULT_REGION"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# serve args in which the cluster differs from serve_config.yaml's one-machine values, as
# docs/cluster.md's "Cluster settings" say; every other arg (autoscaling bounds included) is equal
CLUSTER_SETTINGS = {
    "store",
    "shards_per_group",
    "embedder.num_cpus",
    "embedder.num_gpus",
    "searcher.num_cpus",
    "searcher.resources",
}
DEPLOYMENTS = ("ingress", "embedder", "searcher")
SHARD_RESOURCE = "shard_host"
# each job's script and the cluster.yaml node types its work needs
JOBS = {
    "rayjob-embed.yaml": ("pipelines/embed.py", {"gpu_worker"}),
    "rayjob-build.yaml": ("pipelines/build_index.py", {"shard_worker"}),
}


# ---- loading
def load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one object a file"
    return docs[0]


@functools.cache
def cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@functools.cache
def serve_config_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())


@functools.cache
def rayservice() -> dict[str, Any]:
    return load(KUBERAY_DIR / "rayservice.yaml")


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"][CLUSTER_KEY[doc["kind"]]]


def groups(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cluster's groups by cluster.yaml node type: the head, and `gpu-worker` -> gpu_worker
    (KubeRay puts group names in pod names, where '_' is not allowed)."""
    spec = cluster_spec(doc)
    found = {cluster_yaml()["head_node_type"]: spec["headGroupSpec"]}
    for group in spec.get("workerGroupSpecs") or []:
        found[group["groupName"].replace("-", "_")] = group
    return found


def serve_app(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


# ---- layer 1: KubeRay's CRD schemas
def to_json_schema(node: Any) -> Any:
    """A Kubernetes structural schema (OpenAPI v3 with x-kubernetes-* extensions) as JSON Schema
    with the API server's strict field validation: unknown fields refused."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("enum", "default", "required"):
            out[key] = value  # data, not schemas
        elif not (key.startswith("x-kubernetes-") or key == "nullable"):
            out[key] = to_json_schema(value)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    open_object = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in out
    if "properties" in out and not open_object:
        out["additionalProperties"] = False
    return out


@functools.cache
def schema_note() -> dict[str, Any]:
    return json.loads((SPECS / "kuberay.json").read_text())


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SPECS / schema_note()["schemas"][kind]["file"]).read_text())
    return jsonschema.Draft7Validator(to_json_schema(schema))


def schema_errors(doc: dict[str, Any]) -> list[str]:
    kind = doc.get("kind")
    if doc.get("apiVersion") != API_VERSION or kind not in schema_note()["schemas"]:
        return [f"apiVersion/kind {doc.get('apiVersion')}/{kind}: not a {API_VERSION} we check"]
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in crd_validator(kind).iter_errors(doc)
    ]


# ---- layer 2: what Ray's autoscaler sees
def autoscaler_view(doc: dict[str, Any]) -> dict[str, Any]:
    """Ray's autoscaling config of the cluster, derived by Ray's own KubeRay code from the
    RayCluster the operator makes of this spec (what the autoscaler pod reads)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    ray_cluster = {
        "metadata": {"name": doc["metadata"]["name"], "namespace": "default"},
        "spec": copy.deepcopy(cluster_spec(doc)),
    }
    return _derive_autoscaling_config_from_ray_cr(ray_cluster)


def autoscaler_problems(doc: dict[str, Any]) -> list[str]:
    """cluster.yaml's node types as Ray sees them: resources (memory aside: AWS fills it in from
    the instance type, KubeRay from the pod's limit), labels, worker bounds; idle timeout and
    upscaling speed; Ray's autoscaler on."""
    raw, problems = cluster_yaml(), []
    if cluster_spec(doc).get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true (cluster.yaml autoscales)")
    view = autoscaler_view(doc)
    for name, node in view["available_node_types"].items():
        real_name = raw["head_node_type"] if name == HEAD_GROUP else name.replace("-", "_")
        real = raw["available_node_types"].get(real_name)
        if real is None:
            problems.append(f"group {name}: cluster.yaml has no node type {real_name}")
            continue
        resources = {k: v for k, v in node["resources"].items() if k != "memory"}
        if resources != real["resources"]:
            problems.append(f"{name}: Ray sees resources {resources} != {real['resources']}")
        if node["labels"] != (real.get("labels") or {}):
            problems.append(f"{name}: labels {node['labels']} != cluster.yaml's {real['labels']}")
        bounds = node["min_workers"], node["max_workers"]
        if bounds != (real.get("min_workers", 0), real.get("max_workers", 0)):
            problems.append(f"{name}: min/max workers {bounds} differ from cluster.yaml's")
    for key in ("idle_timeout_minutes", "upscaling_speed"):
        if view[key] != raw[key]:
            problems.append(f"Ray sees {key} {view[key]}, cluster.yaml {raw[key]}")
    return problems


# ---- layer 3: pods
def expected_node(name: str) -> dict[str, Any]:
    """What a pod of cluster.yaml's node type `name` must have: image, env, container mounts."""
    raw = cluster_yaml()
    node = raw["available_node_types"][name]
    head = name == raw["head_node_type"]
    role = "head" if head else "worker"
    docker = {**raw["docker"], **(node.get("docker") or {})}
    options = [*docker.get("run_options", []), *docker.get(f"{role}_run_options", [])]
    env, mounts = {}, []
    for flag, value in _pairs(shlex.split(" ".join(options))):
        if flag == "-e":
            key, _, val = value.partition("=")
            env[key] = val
        elif flag == "-v":
            mounts.append(value.split(":")[1])
    for command in raw[f"{role}_start_ray_commands"]:
        for exports in re.findall(r"\bexport\s+([^;]+);", command):
            env.update(word.split("=", 1) for word in shlex.split(exports))
    return {
        "image": docker.get(f"{role}_image") or docker["image"],
        "env": env,
        "mounts": mounts,
        "instance_type": node["node_config"]["InstanceType"],
        "gpus": node["resources"].get("GPU", 0),
    }


def _pairs(words: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(words, words[1:], strict=False) if a in ("-e", "-v")]


def _quantity(value: Any) -> float:
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    return float(parse_quantity(str(value)))


def pod_problems(doc: dict[str, Any]) -> list[str]:
    """Every group's pod runs like cluster.yaml's node of that type (see the module docstring)."""
    raw, problems = cluster_yaml(), []
    secrets = AWS_SECRETS | ({ENV_API_KEY} if doc["kind"] == "RayService" else set())
    for name, group in groups(doc).items():
        if name not in raw["available_node_types"]:
            problems.append(f"group for {name}: not a node type of cluster.yaml")
            continue
        want, pod = expected_node(name), group["template"]["spec"]
        container = pod["containers"][0]
        label = group.get("groupName", "head")
        if not DNS_LABEL.match(label):
            problems.append(f"group name {label!r} is not a DNS label (KubeRay's pod names)")
        if container.get("image") != want["image"]:
            problems.append(f"{label}: image {container.get('image')} != {want['image']}")
        command = " ".join(container.get("command", []) + container.get("args", []))
        for step in raw["setup_commands"]:
            if step not in command:
                problems.append(f"{label}: the command lacks cluster.yaml's setup {step!r}")
        if "ray start" in command:
            problems.append(f"{label}: KubeRay generates `ray start` only for commands without it")
        mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
        if SOURCE_ARCHIVE not in command or str(Path(SOURCE_ARCHIVE).parent) not in mounted:
            problems.append(f"{label}: the repository ({SOURCE_ARCHIVE}) is not unpacked/mounted")
        problems += [f"{label}: {p}" for p in env_problems(container, want["env"], secrets)]
        for path in want["mounts"]:
            if path not in mounted:
                problems.append(f"{label}: cluster.yaml mounts {path}; this pod does not")
        instance = (pod.get("nodeSelector") or {}).get(INSTANCE_LABEL)
        if instance != want["instance_type"]:
            problems.append(f"{label}: nodeSelector {instance} != {want['instance_type']}")
        problems += [f"{label}: {p}" for p in size_problems(container, instance, want["gpus"])]
    return problems


def env_problems(container: dict, want: dict[str, str], secrets: set[str]) -> list[str]:
    """The env cluster.yaml gives the node type, keys from Secrets (never in a file), the
    region of cluster.yaml, and nothing else: an extra variable here is drift from the VMs."""
    env = {e["name"]: e for e in container.get("env", [])}
    problems = [
        f"env {key}={env.get(key, {}).get('value')!r}, cluster.yaml {value!r}"
        for key, value in want.items()
        if env.get(key, {}).get("value") != value
    ]
    problems += [
        f"env {key} must come from a Secret (valueFrom.secretKeyRef)"
        for key in sorted(secrets)
        if "secretKeyRef" not in (env.get(key, {}).get("valueFrom") or {})
    ]
    if env.get(REGION_ENV, {}).get("value") != cluster_yaml()["provider"]["region"]:
        problems.append(f"env {REGION_ENV} must be cluster.yaml's region")
    extra = set(env) - set(want) - secrets - {REGION_ENV}
    if extra:
        problems.append(f"env {sorted(extra)} not set on this node type by cluster.yaml")
    return problems


def size_problems(container: dict, instance: str | None, gpus: float) -> list[str]:
    """A pod that asks for more than its instance has never schedules, and a GPU pod gets its
    GPU only through the device plugin's limit."""
    vcpus, gib = INSTANCE_SIZES.get(instance, (0, 0))
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    problems = []
    if not 0 < _quantity(requests.get("cpu", 0)) < vcpus:
        problems.append(f"cpu request must be under the instance's {vcpus} vCPU")
    if not 0 < _quantity(limits.get("memory", 0)) < gib * 2**30:
        problems.append(f"memory limit must be under the instance's {gib} GiB")
    if _quantity(limits.get(GPU_LIMIT, 0)) != gpus:
        problems.append(f"{GPU_LIMIT} limit must be the node type's GPU count {gpus}")
    return problems


def version_problems(doc: dict[str, Any]) -> list[str]:
    """rayVersion = the images' Ray = the Ray pyproject.toml pins."""
    from packaging.requirements import Requirement

    version = cluster_spec(doc).get("rayVersion", "")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [Requirement(d) for d in project["dependencies"] if d.startswith("ray[")]
    problems = [f"rayVersion {version!r}: not {r}" for r in pins if version not in r.specifier]
    for name, group in groups(doc).items():
        image = group["template"]["spec"]["containers"][0].get("image", "")
        if not image.partition(":")[2].startswith(f"{version}-"):
            problems.append(f"{name}: image {image} is not Ray {version}")
    return problems


# ---- the Serve app
def _flat_args(args: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in args.items() if k not in DEPLOYMENTS}
    for name in DEPLOYMENTS:
        flat.update({f"{name}.{k}": v for k, v in (args.get(name) or {}).items()})
    return flat


def serve_problems(doc: dict[str, Any]) -> list[str]:
    """serve_config.yaml's applications (import path, route, args and autoscaling bounds) with
    docs/cluster.md's cluster settings; proxies on every node, on all interfaces."""
    ours, repo = serve_app(doc), serve_config_yaml()
    problems = []
    if ours.get("proxy_location") != "EveryNode":
        problems.append("proxy_location must be EveryNode (a proxy beside each node's replicas)")
    if (ours.get("http_options") or {}).get("host") != "0.0.0.0":
        problems.append("http_options.host must be 0.0.0.0 (the serve Service reaches the pods)")
    apps = {a["name"]: a for a in ours.get("applications", [])}
    repo_apps = {a["name"]: a for a in repo["applications"]}
    if set(apps) != set(repo_apps):
        problems.append(f"applications {sorted(apps)} != serve_config.yaml's {sorted(repo_apps)}")
    for name, app in repo_apps.items():
        mine = apps.get(name, {})
        for key in ("import_path", "route_prefix"):
            if mine.get(key) != app.get(key):
                problems.append(f"{name}.{key}: {mine.get(key)!r} != {app.get(key)!r}")
        problems += [f"{name}.args.{p}" for p in args_problems(app["args"], mine.get("args", {}))]
    return problems


def args_problems(repo_args: dict[str, Any], args: dict[str, Any]) -> list[str]:
    flat_repo, flat, missing = _flat_args(repo_args), _flat_args(args), object()
    problems = [
        f"{key}: {flat.get(key, missing)!r}, serve_config.yaml {flat_repo.get(key, missing)!r}"
        for key in sorted((set(flat) | set(flat_repo)) - CLUSTER_SETTINGS)
        if flat.get(key, missing) != flat_repo.get(key, missing)
    ]
    if "api_key" in args:
        problems.append(f"api_key: inline; the app reads {ENV_API_KEY} from the Secret")
    if not str(args.get("store", "")).startswith("s3://"):
        problems.append(f"store: {args.get('store')!r} is not on S3")
    gpus = flat.get("embedder.num_gpus")
    if not isinstance(gpus, (int, float)) or gpus < 1:
        problems.append(f"embedder.num_gpus: {gpus!r}; ask for 1 (workers start at zero)")
    shard_host = cluster_yaml()["available_node_types"]["shard_worker"]["resources"]
    if (flat.get("searcher.resources") or {}).get(SHARD_RESOURCE, 0) <= 0:
        problems.append(f"searcher.resources: needs {SHARD_RESOURCE} (the memory nodes)")
    if args.get("shards_per_group") != shard_host[SHARD_RESOURCE]:
        problems.append(f"shards_per_group: one shard_worker's {shard_host[SHARD_RESOURCE]} slots")
    return problems


def unplaced_deployments(doc: dict[str, Any]) -> list[str]:
    """Deployments whose replica (as the app asks for it) fits no worker group Ray sees."""
    (app,) = serve_app(doc)["applications"]
    config = ServeConfig.from_dict(app["args"]).validate()
    slots = config.shards_per_group or 1
    asks = {
        "Ingress": config.ingress.deployment_options(),
        "QueryEmbedder": config.embedder.deployment_options(),
        "ShardSearcher": config.searcher.deployment_options(slots=slots),
    }
    nodes = autoscaler_view(doc)["available_node_types"]
    workers = [n["resources"] for name, n in nodes.items() if name != HEAD_GROUP]
    unplaced = []
    for name, options in asks.items():
        actor = options["ray_actor_options"]
        bundle = {"CPU": actor["num_cpus"], "GPU": actor["num_gpus"], **actor.get("resources", {})}
        if not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in workers):
            unplaced.append(f"{name} {bundle}")
    return unplaced


# ---- the jobs
def job_problems(doc: dict[str, Any], name: str) -> list[str]:
    """The entrypoint runs the job's script from the repository in the pod, parses with the
    script's own parser, writes the RayService's store, and asks for what the groups have."""
    from pipelines.build_index import load_config
    from pipelines.embed_config import config_from_args

    script, needs = JOBS[name]
    words = shlex.split(doc["spec"]["entrypoint"])
    problems = []
    if words[:2] != ["python", f"{REPO_IN_POD}/{script}"]:
        problems.append(f"entrypoint must run python {REPO_IN_POD}/{script}: {words[:2]}")
    if not doc["spec"].get("shutdownAfterJobFinishes"):
        problems.append("shutdownAfterJobFinishes: the job's cluster (GPUs) would outlive it")
    missing = needs - set(groups(doc))
    if missing:
        problems.append(f"the job's work needs node types {sorted(missing)}")
    (app,) = serve_app(rayservice())["applications"]
    if script.endswith("embed.py"):
        config = config_from_args(words[2:])
        if not config.num_gpus or config.num_gpus < 1:
            problems.append("embed: --num-gpus 1, or the autoscaler never starts a GPU node")
        most = cluster_yaml()["available_node_types"]["gpu_worker"]["max_workers"]
        if config.actors and config.actors * (config.num_gpus or 0) > most:
            problems.append(f"embed: {config.actors} actors need more GPUs than {most} nodes")
        inputs_ok = config.input and all(i.startswith("s3://") for i in config.input)
        problems += [] if inputs_ok else [f"embed: inputs {config.input} not on S3"]
    else:
        config = load_config(words[2:]).validate()
        if config.node_resource != SHARD_RESOURCE:
            problems.append(f"build: --node-resource {SHARD_RESOURCE} (the pool starts at zero)")
    if config.store != app["args"]["store"]:
        problems.append(f"store {config.store} is not the RayService's {app['args']['store']}")
    return problems


# ---- tests: the files
def test_the_manifests_and_schemas_are_found():
    assert EXPECTED_MANIFESTS <= set(IDS), IDS
    note = schema_note()
    assert note["api_version"] == API_VERSION and note["kuberay_version"].startswith("v1.")
    assert note["kuberay_version"] in (SPECS / "README.md").read_text()
    assert f"KubeRay {note['kuberay_version']}" in (ROOT / "docs" / "cluster.md").read_text()
    for kind in note["schemas"]:
        jsonschema.Draft7Validator.check_schema(crd_validator(kind).schema)


@pytest.mark.parametrize("path", MANIFESTS, ids=IDS)
def test_manifest_matches_kuberays_crd_schema(path):
    assert schema_errors(load(path)) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=IDS)
def test_ray_autoscaler_sees_cluster_yamls_node_types(path):
    assert autoscaler_problems(load(path)) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=IDS)
def test_pods_run_like_cluster_yamls_nodes(path):
    doc = load(path)
    assert pod_problems(doc) == []
    assert version_problems(doc) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("path", MANIFESTS, ids=IDS)
def test_pod_commands_parse(path):
    """What KubeRay runs: the container's command, then `&&` its generated `ray start`."""
    for group in groups(load(path)).values():
        container = group["template"]["spec"]["containers"][0]
        command = " ".join(container.get("command", []) + container.get("args", []))
        full = f"{command} && ulimit -n 65536; ray start --block"
        done = subprocess.run(["bash", "-n", "-c", full], capture_output=True, text=True)
        assert done.returncode == 0, f"{full!r}: {done.stderr}"


def test_rayservice_has_every_node_type_of_cluster_yaml():
    doc = rayservice()
    assert set(groups(doc)) == set(cluster_yaml()["available_node_types"])
    assert autoscaler_view(doc)["max_workers"] == cluster_yaml()["max_workers"]


def test_rayservice_serves_serve_config_yamls_app():
    from ray.serve.schema import ServeDeploySchema

    doc = rayservice()
    ServeDeploySchema.model_validate(serve_app(doc))  # what `serve deploy` checks first
    for app in serve_app(doc)["applications"]:
        ServeConfig.from_dict(app["args"]).validate()  # what app_builder checks next
    assert serve_problems(doc) == []


def test_rayservice_replicas_fit_its_worker_groups():
    assert unplaced_deployments(rayservice()) == []


@pytest.mark.parametrize("name", sorted(JOBS))
def test_job_runs_its_pipeline(name):
    assert job_problems(load(KUBERAY_DIR / name), name) == []


# ---- tests: each layer rejects a broken manifest
def _mutate(name: str, edit) -> dict[str, Any]:
    doc = json.loads(json.dumps(load(KUBERAY_DIR / name)))  # no shared YAML aliases
    edit(doc)
    return doc


def _group(doc: dict, node_type: str) -> dict:
    return groups(doc)[node_type]


def _container(doc: dict, node_type: str) -> dict:
    return _group(doc, node_type)["template"]["spec"]["containers"][0]


def _set(mapping: dict, key: str, value: Any) -> None:
    mapping[key] = value


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _edit_serve(doc: dict, edit) -> None:
    config = serve_app(doc)
    edit(config)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)


def _edit_args(doc: dict, edit) -> None:
    _edit_serve(doc, lambda config: edit(config["applications"][0]["args"]))


def _env(doc: dict, node_type: str) -> dict[str, dict]:
    return {e["name"]: e for e in _container(doc, node_type)["env"]}


SCHEMA_REJECTS = {
    "minReplicas as a string": (
        "rayservice.yaml",
        lambda d: _set(_group(d, "gpu_worker"), "minReplicas", "0"),
        "is not of type 'integer'",
    ),
    "a typo in a field name": (
        "rayservice.yaml",
        lambda d: _rename(_group(d, "shard_worker"), "maxReplicas", "maxReplica"),
        "'maxReplica' was unexpected",
    ),
    "serveConfigV2 as a mapping, not a YAML string": (
        "rayservice.yaml",
        lambda d: _set(d["spec"], "serveConfigV2", serve_app(d)),
        "is not of type 'string'",
    ),
    "a memory quantity with a space": (
        "rayservice.yaml",
        lambda d: _set(_container(d, "gpu_worker")["resources"]["limits"], "memory", "56 Gi"),
        "does not match",
    ),
    "enableInTreeAutoscaling as a string": (
        "rayjob-embed.yaml",
        lambda d: _set(d["spec"]["rayClusterSpec"], "enableInTreeAutoscaling", "yes"),
        "is not of type 'boolean'",
    ),
    "an env value as a number": (
        "rayjob-build.yaml",
        lambda d: _set(_container(d, "shard_worker")["env"][0], "value", 1),
        "is not of type 'string'",
    ),
    "a RayJob without its cluster's head": (
        "rayjob-build.yaml",
        lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"),
        "'headGroupSpec' is a required property",
    ),
    "an old apiVersion": (
        "rayjob-embed.yaml",
        lambda d: _set(d, "apiVersion", "ray.io/v1alpha1"),
        "not a ray.io/v1",
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA_REJECTS))
def test_schema_rejects_broken_manifest(case):
    name, edit, mentioned = SCHEMA_REJECTS[case]
    errors = schema_errors(_mutate(name, edit))
    assert any(mentioned in e for e in errors), f"{case}: {errors}"


STEP_REJECTS = {
    "shard group loses shard_host": (
        "rayservice.yaml",
        lambda d: _group(d, "shard_worker")["resources"].pop(SHARD_RESOURCE),
        autoscaler_problems,
        "resources",
    ),
    "GPU group with half its CPUs": (
        "rayjob-embed.yaml",
        lambda d: _group(d, "gpu_worker")["resources"].update(CPU="8"),
        autoscaler_problems,
        "resources",
    ),
    "a label that differs": (
        "rayservice.yaml",
        lambda d: _set(_group(d, "gpu_worker"), "labels", {"visual-search/role": "gpu"}),
        autoscaler_problems,
        "labels",
    ),
    "a worker bound that differs": (
        "rayjob-build.yaml",
        lambda d: _set(_group(d, "shard_worker"), "maxReplicas", 4),
        autoscaler_problems,
        "min/max workers",
    ),
    "an idle timeout that differs": (
        "rayservice.yaml",
        lambda d: _set(cluster_spec(d)["autoscalerOptions"], "idleTimeoutSeconds", 60),
        autoscaler_problems,
        "idle_timeout_minutes",
    ),
    "a rayVersion that is not the pinned Ray": (
        "rayjob-build.yaml",
        lambda d: _set(cluster_spec(d), "rayVersion", "2.59.0"),
        version_problems,
        "rayVersion '2.59.0'",
    ),
    "the GPU group on the CPU image": (
        "rayservice.yaml",
        lambda d: _set(_container(d, "gpu_worker"), "image", "rayproject/ray:2.60.0-py311-cpu"),
        pod_problems,
        "image",
    ),
    "the API key inline, not from the Secret": (
        "rayservice.yaml",
        lambda d: _env(d, "head")[ENV_API_KEY].update(value="k", valueFrom=None),
        pod_problems,
        ENV_API_KEY,
    ),
    "no setup command": (
        "rayjob-embed.yaml",
        lambda d: _set(_container(d, "gpu_worker"), "command", []),
        pod_problems,
        "setup",
    ),
    "the shard cache not mounted": (
        "rayservice.yaml",
        lambda d: _container(d, "shard_worker")["volumeMounts"].pop(),
        pod_problems,
        "/mnt/nvme",
    ),
    "a 30% object store on shard nodes": (
        "rayjob-build.yaml",
        lambda d: _env(d, "shard_worker")["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"].update(
            value="0.3"
        ),
        pod_problems,
        "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION",
    ),
    "a pod bigger than its instance": (
        "rayservice.yaml",
        lambda d: _set(_container(d, "shard_worker")["resources"]["limits"], "memory", "200Gi"),
        pod_problems,
        "128 GiB",
    ),
    "a group name with '_'": (
        "rayservice.yaml",
        lambda d: _set(_group(d, "gpu_worker"), "groupName", "gpu_worker"),
        pod_problems,
        "DNS label",
    ),
    "another import path": (
        "rayservice.yaml",
        lambda d: _edit_serve(d, lambda c: c["applications"][0].update(import_path="x:app")),
        serve_problems,
        "import_path",
    ),
    "another embedder autoscaling bound": (
        "rayservice.yaml",
        lambda d: _edit_args(d, lambda a: a["embedder"].update(max_replicas=3)),
        serve_problems,
        "embedder.max_replicas",
    ),
    "the query embedder on num_gpus auto": (
        "rayservice.yaml",
        lambda d: _edit_args(d, lambda a: a["embedder"].update(num_gpus="auto")),
        serve_problems,
        "embedder.num_gpus",
    ),
    "shard groups that take more slots than a node has": (
        "rayservice.yaml",
        lambda d: _edit_args(d, lambda a: a["searcher"].update(resources={SHARD_RESOURCE: 2})),
        unplaced_deployments,
        "ShardSearcher",
    ),
    "an embed job on CPUs only": (
        "rayjob-embed.yaml",
        lambda d: _set(d["spec"], "entrypoint", d["spec"]["entrypoint"] + " --num-gpus 0"),
        lambda d: job_problems(d, "rayjob-embed.yaml"),
        "--num-gpus",
    ),
    "a build job that writes another store": (
        "rayjob-build.yaml",
        lambda d: _set(d["spec"], "entrypoint", d["spec"]["entrypoint"] + " --store s3://x/y"),
        lambda d: job_problems(d, "rayjob-build.yaml"),
        "store",
    ),
}


@pytest.mark.parametrize("case", list(STEP_REJECTS))
def test_step_checks_reject_drift(case):
    name, edit, check, mentioned = STEP_REJECTS[case]
    problems = check(_mutate(name, edit))
    assert any(mentioned in p for p in problems), f"{case}: {problems}"
