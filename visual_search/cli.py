"""``visual-search``: one command for every job, each subcommand the job module's own entry point.

    visual-search embed IMAGES... --store ROOT      images -> sharded Parquet (Ray Data)
    visual-search build --store ROOT                Parquet -> per-shard FAISS indexes (Ray tasks)
    visual-search rebuild --store ROOT              fold deltas and deletes into new versions
    visual-search route SRC DST --shards N          a routed copy: rows placed by their vectors
    visual-search serve --store ROOT                the HTTP app and search page (Ray Serve)
    visual-search search IMAGE | --id ID | --vector FILE    query a running app
    visual-search stats                             a running app's catalogue
    visual-search recall --store ROOT --queries Q   recall@k of the indexes over nprobe
    visual-search demo                              the whole thing on sample photos

``visual-search COMMAND --help`` shows a command's options. A command runs exactly the code its
script form runs (``python pipelines/embed.py ...`` is ``visual-search embed ...``), so it runs
the same way on a cluster: ``ray job submit --working-dir . -- visual-search embed ...`` (or
``python -m visual_search embed ...`` where the console script is not installed). A job that
starts a Ray of its own (no ``--address``, no ``$RAY_ADDRESS``) binds it to 127.0.0.1
(``pipelines/local_ray.py``).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from visual_search import exits


@dataclass(frozen=True)
class Command:
    module: str
    function: str
    summary: str
    local_ray: bool = False  # may start a Ray of its own: loopback settings first


COMMANDS = {
    "embed": Command(
        "pipelines.embed", "main", "embed images into the store's sharded Parquet", True
    ),
    "build": Command("pipelines.build_index", "main", "build the shard indexes", True),
    "rebuild": Command("pipelines.rebuild", "main", "fold deltas and deletes into new versions"),
    "route": Command(
        "pipelines.route_store", "main", "copy a store into shards routed by vector", True
    ),
    "serve": Command(
        "visual_search.serve_cli", "main", "start the app on a local or running Ray", True
    ),
    "search": Command("visual_search.query_cli", "search_main", "query a running app"),
    "stats": Command("visual_search.query_cli", "stats_main", "a running app's catalogue"),
    "recall": Command("index.live.recall", "main", "recall@k of a store's indexes over nprobe"),
    "demo": Command(
        "visual_search.demo", "main", "embed, index, serve and query sample photos", True
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    return (
        "usage: visual-search COMMAND [options]   (visual-search COMMAND --help)\n\n"
        "Image similarity search on Ray: one command for every job.\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\nexit status (every command):\n"
        + exits.table()
        + "\n"
    )


def _status(result: object) -> int:
    """A job's return (an int, None, or recall's result dict) or SystemExit code -> int."""
    if result is None or isinstance(result, dict):
        return exits.OK
    if isinstance(result, int):
        return result
    print(result, file=sys.stderr)  # SystemExit("message")
    return exits.FAILED


def _no_cluster(args: list[str]) -> bool:
    """Whether the job will start a Ray of its own: no ``$RAY_ADDRESS``, no ``--address X``
    (``--address local`` is a Ray of its own too)."""
    address = os.environ.get("RAY_ADDRESS") or None
    for i, arg in enumerate(args):
        if arg == "--address" and i + 1 < len(args):
            address = args[i + 1]
        elif arg.startswith("--address="):
            address = arg.split("=", 1)[1]
    return address in (None, "", "local")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return exits.OK if argv else exits.USAGE
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"visual-search: unknown command {name!r}\n\n{usage()}", end="", file=sys.stderr)
        return exits.USAGE
    if command.local_ray and _no_cluster(rest):
        from pipelines.local_ray import use_local_ray_env

        use_local_ray_env()  # a Ray this job starts listens on 127.0.0.1 only
    entry = getattr(importlib.import_module(command.module), command.function)
    saved = sys.argv
    sys.argv = [f"visual-search {name}", *rest]  # argparse's prog: "visual-search embed"
    try:
        return _status(entry(rest))
    except SystemExit as e:  # argparse (2 for bad usage, 0 for --help), the jobs' own exits
        return _status(e.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exits.INTERRUPTED
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
