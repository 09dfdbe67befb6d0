"""The system on a ``ray start --head`` the way cluster users run it: jobs submitted, app deployed.

Shared by ``tests/test_cluster_ops.py`` and ``benchmarks/grafana_board.py``: ``ray job submit`` of
the embedding job and then of the index build into a store, and ``serve deploy`` of a copy of
``serve/serve_config.yaml`` with only the store, the port and the given settings changed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
import yaml

from harness.polling import free_port, wait_for
from harness.ray_head import ROOT, RayHead


def embed_and_build(head: RayHead, photos: Path, root: Path, shards: int) -> SimpleNamespace:
    """Two jobs submitted to the head: embed ``photos`` into ``shards`` shards with the README's
    job line (``python pipelines/embed.py``), then build with the console script
    (``visual-search build``: the installed command resolves in a job as the scripts do)."""
    embed_log = head.submit(
        "python", "pipelines/embed.py", "--input", str(photos), "--store", str(root),
        "--num-shards", str(shards), "--batch-size", "8", "--actors", "2",
    )  # fmt: skip
    build_log = head.submit("visual-search", "build", "--store", str(root))
    return SimpleNamespace(embed_log=embed_log, build_log=build_log)


def deploy(head: RayHead, root: Path, folder: Path, **settings) -> SimpleNamespace:
    """``serve deploy`` of the repo's config file with the store, a free port and ``settings``
    (ServeConfig fields) changed; returns once ``/readyz`` answers 200."""
    config = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["store"] = str(root)
    args.update(settings)
    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    head.run(["serve", "deploy", "--address", head.dashboard_url, str(path)], timeout_s=120)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def ready():
        try:
            response = client.get("/readyz")
        except httpx.TransportError:
            return None
        return response if response.status_code == 200 else None

    try:
        readyz = wait_for(ready, 240, "/readyz of the deployed app to answer 200", interval_s=1.0)
    except BaseException:
        client.close()
        raise
    return SimpleNamespace(client=client, readyz=readyz.json(), config=config)
