"""``visual-search serve``: start the app on a Ray of its own, or deploy it on a running one.

    visual-search serve --store ./store                        # local Ray, http://127.0.0.1:8000
    visual-search serve --store ./store --port 8080 --set shard_deadline_ms=500
    visual-search serve --config serve.yaml --address auto --detach   # onto a running cluster

Without ``--address`` (or ``$RAY_ADDRESS``) it starts a local Ray bound to 127.0.0.1
(``pipelines.local_ray``; Serve's throughput mode behind its HAProxy ingress unless
``--serve-mode`` says otherwise, ``serve.local``), deploys the
app (``serve.app.build_app``: the graph ``serve run serve.app:app`` deploys), shows its
deployments coming up, prints where the search page and the API are, and serves until Ctrl-C or
SIGTERM; then it shuts Serve and that Ray down and exits 0. With ``--address`` it joins that
cluster instead; stopping the command deletes the app, as ``serve run`` does, unless
``--detach`` (deploy, wait until ready, return and leave it running).

Settings: the YAML of ``--config`` (``serve.config.ServeConfig`` fields; default
``$VISUAL_SEARCH_SERVE_CONFIG``), then each ``--set KEY=VALUE`` (``searcher.num_cpus=0.5`` for a
deployment's settings), then ``--store``. Exit status: 0 served and stopped, 1 the app failed to
deploy, 2 bad settings (no store, another model's store), 3 the cluster cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from serve.local import DEFAULT_MODE, SERVE_MODES
from visual_search import exits
from visual_search.serving import run_app, serve_forever, shutdown, start_ray, stop_on_sigterm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Start the search app (HTTP API + search page) on a local or running Ray.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", help="store root URI (default: the config's, $VISUAL_SEARCH_STORE)")
    p.add_argument("--config", help="YAML of serve settings (ServeConfig fields)")
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one setting, e.g. default_k=20 or searcher.num_cpus=0.5 (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--address",
        help="a running Ray to deploy on (auto, HOST:PORT, ray://...; default $RAY_ADDRESS, "
        "else a local Ray of its own)",
    )
    p.add_argument("--detach", action="store_true", help="deploy on --address and return")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (max(4, cores))")
    p.add_argument("--ray-temp-dir", help="temp dir of a local Ray (keep the path short)")
    p.add_argument(
        "--serve-mode",
        choices=tuple(SERVE_MODES),
        default=DEFAULT_MODE,
        help="a local Ray's Serve mode: haproxy (default: throughput mode behind Serve's "
        "HAProxy ingress), throughput (behind the Python proxy) or default (as installed)",
    )
    args = p.parse_args(argv)
    args.address = args.address or os.environ.get("RAY_ADDRESS") or None
    if args.detach and not args.address:
        p.error("--detach needs a running Ray (--address or $RAY_ADDRESS): a local Ray ends here")
    try:
        args.overrides = overrides(args)
    except (OSError, ValueError, yaml.YAMLError) as e:
        p.error(str(e))
    return args


def overrides(args: argparse.Namespace) -> dict:
    """The settings from ``--config``, ``--set`` and ``--store``, as ``ServeConfig`` fields."""
    values: dict = {}
    if args.config:
        values = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
    for item in args.settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(raw) if raw else ""
        if "." in key:
            group, name = key.split(".", 1)
            values.setdefault(group, {})[name] = value
        else:
            values[key] = value
    if args.store:
        values["store"] = args.store
    return values


def _deploy(args: argparse.Namespace, config) -> None:
    from serve.app import build_app, load_store_manifest

    manifest = load_store_manifest(config)
    groups = -(-manifest.num_shards // (config.shards_per_group or manifest.num_shards))
    total = 1 + int(config.image_queries) + groups + int(config.writes)
    total += int(config.canary_fraction > 0)
    run_app(build_app(config), config, args.host, args.port, deployments=total)
    host = "127.0.0.1" if args.host == "0.0.0.0" else args.host
    url = f"http://{host}:{args.port}{config.route_prefix.rstrip('/')}"
    print(
        f"serving {manifest.num_shards} shards of {config.store} ({manifest.model_tag})\n"
        f"  search page  {url}/\n"
        f"  API docs     {url}/docs\n"
        f"  query        visual-search search IMAGE --url {url}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from serve.app import config_from_args
    from serve.config import ConfigError
    from serve.deployments.embedder import ModelMismatch

    try:
        config = config_from_args(args.overrides).validate()
    except ConfigError as e:
        print(f"visual-search serve: error: {e}", file=sys.stderr)
        return exits.USAGE
    try:
        ray = start_ray(args.serve_mode, args.ray_temp_dir, args.num_cpus, args.address)
    except ConnectionError as e:
        print(f"visual-search serve: cannot reach Ray at {args.address}: {e}", file=sys.stderr)
        return exits.UNREACHABLE
    stop_on_sigterm()
    deployed = False
    try:
        _deploy(args, config)
        deployed = True
        if args.detach:
            return exits.OK
        print("(Ctrl-C stops)", flush=True)
        serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
        return exits.OK if deployed else exits.INTERRUPTED
    except (ConfigError, ModelMismatch) as e:
        print(f"visual-search serve: error: {e}", file=sys.stderr)
        return exits.USAGE
    except Exception as e:  # a replica that cannot start (a broken store, a lost node)
        print(f"visual-search serve: the app failed to start: {e}", file=sys.stderr)
        return exits.FAILED
    finally:
        if not (args.detach and deployed):
            shutdown(ray, config.app_name if args.address else None)


if __name__ == "__main__":
    sys.exit(main())
