"""A built store served from S3: what a new replica pays before it answers (#24.4).

``s3_first_query`` copies what a replica reads of a built local store (its manifests and each
shard's live version directory; not the Parquet parts, which a replica only lists, and which are
all covered by the versions here) into a fresh bucket of moto's S3 server on 127.0.0.1
(``harness.s3.S3Server``), then runs the app over ``s3://`` in a fresh process twice with one
node cache (``$VISUAL_SEARCH_CACHE``, emptied first):

- **cold**: a replica on a new node: every version downloaded into the node cache, every file
  hashed against its ``meta.json``, the indexes read and the rerank vectors mapped;
- **warm**: a replica restarting on a node that has the copies: no download, and the hashes
  remembered per node (``index.storage.digests``) unless a file was written within ``RACY_S``
  of its hash.

Each: ``first_query_s`` (``serve.run`` to the first query every shard answered,
``harness.serve_runs``) and the shards' load timings from ``/stats`` (``fetch_s``, ``verify_s``,
``open_s``: summed over shards, and the slowest shard). moto keeps objects in this process (large
ones spill to temporary files), so the upload costs RAM and disk here, not in the replicas.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import numpy as np

from harness import serve_runs
from harness.s3 import S3Server
from index.storage.manifest import load_manifest
from index.storage.store import Store

TIMINGS = ("fetch_s", "verify_s", "open_s")


def replica_files(store: Store) -> list[str]:
    """Paths (relative to the root) a replica reads: the manifests and the live versions."""
    root = Path(store.uri)
    manifest = load_manifest(store)
    paths = [str(p.relative_to(root)) for p in (root / "_manifests").iterdir()]
    paths += [p for p in ("manifest.json",) if (root / p).exists()]
    for shard, state in manifest.shards.items():
        if state.dir is not None:
            paths.append(store.relative(store.index_version_dir(shard, state.dir)))
    for extra in (manifest.router, manifest.transform):
        if extra:
            paths.append(extra)
    return sorted(paths)


def upload(store: Store, s3: S3Server) -> tuple[str, dict]:
    """The replica's files of ``store`` in a new bucket: (``s3://`` root, size and time)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options)
    bucket = s3.new_bucket("scale")
    remote_root = f"{bucket}/store"
    local_root = Path(store.uri)
    total, t = 0, time.perf_counter()
    for rel in replica_files(store):
        local = local_root / rel
        if local.is_dir():
            fs.put(str(local) + "/", f"{remote_root}/{rel}/", recursive=True)
            total += sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
        else:
            fs.put_file(str(local), f"{remote_root}/{rel}")
            total += local.stat().st_size
    seconds = time.perf_counter() - t
    return remote_root, {
        "bytes": total,
        "seconds": round(seconds, 1),
        "mb_per_s": round(total / 2**20 / seconds, 1),
    }


def load_summary(stats: dict) -> dict:
    """The shards' load timings: summed over shards and the slowest shard's, per step."""
    timings = [row.get("load_timings") or {} for row in stats.get("shards", [])]
    out: dict = {"shards": len(timings)}
    for key in TIMINGS:
        values = [t.get(key, 0.0) for t in timings]
        out[f"{key}_sum"] = round(sum(values), 2)
        out[f"{key}_max"] = round(max(values, default=0.0), 2)
    return out


def s3_first_query(args, store_uri: str, queries, truth, k: int = 10) -> dict:
    """Upload ``store_uri``'s replica files to moto and time a cold and a warm replica start."""
    s3 = S3Server()
    cache = Path(args.workdir) / "s3-node-cache"
    shutil.rmtree(cache, ignore_errors=True)
    before = os.environ.get("VISUAL_SEARCH_CACHE")
    os.environ["VISUAL_SEARCH_CACHE"] = str(cache)  # the replicas' node cache (inherited)
    try:
        remote, uploaded = upload(Store(store_uri), s3)
        print(f"uploaded {uploaded} to {remote}", flush=True)
        run = copy.copy(args)
        run.modes, run.entries, run.candidates = ["haproxy"], ["proxy"], None
        run.concurrency, run.requests, run.wrk_seconds = [1], 50, 0
        run.storage_options = s3.storage_options
        ids = [i for row in truth for i in row]
        rows = np.arange(len(ids)).reshape(len(truth), k)
        out: dict = {"store": remote, "upload": uploaded}
        for start in ("cold", "warm"):
            body = serve_runs.over_http(run, remote, queries, rows, ids)["haproxy"]
            out[start] = {
                "first_query_s": body["first_query_s"],
                "serve_start_s": body["serve_start_s"],
                "load": load_summary(body.get("stats", {})),
                "http_p50_ms_c1": body["proxy"]["1"]["p50_ms"],
                "recall_at_10": body["proxy"].get("recall_at_10"),
            }
            print(f"S3 {start}: {out[start]}", flush=True)
        out["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        return out
    finally:
        if before is None:
            os.environ.pop("VISUAL_SEARCH_CACHE", None)
        else:
            os.environ["VISUAL_SEARCH_CACHE"] = before
        s3.stop()
