"""Which version each serving replica holds: small lease files that garbage collection reads.

A replica serving shard ``s`` writes ``_serving/shard=SSSSS/<replica>.json`` =
``{"dir": "vNNNNNN-xxxxxxxx", "at": <unix time>, "host", "pid"}`` when it loads or swaps to a
version and again every ``LEASE_INTERVAL_S``. A lease is *fresh* for ``ttl_s`` after ``at``;
garbage collection (``index.storage.gc``) never deletes a version a fresh lease names, and never
retires
the parts an older version still needs while a fresh lease names that version. A replica that
dies stops renewing; its lease goes stale after ``ttl_s`` and is removed later.

Cost: one small PUT per replica per interval, and one listing plus one GET per replica of the
shard when garbage collection looks at that shard (only after a rebuild, not on every poll).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
from dataclasses import dataclass, field

from index.storage.store import Store

LEASE_INTERVAL_S = 10.0
LEASE_TTL_S = 60.0
STALE_LEASE_FACTOR = 10  # a lease this many TTLs old belongs to a dead replica: delete it


@dataclass
class Leases:
    served: set[str] = field(default_factory=set)  # version dirs named by fresh leases
    fresh: dict[str, str] = field(default_factory=dict)  # replica -> dir
    dead: list[str] = field(default_factory=list)  # paths of long-expired lease files


def lease_path(store: Store, shard: int, replica: str) -> str:
    return posixpath.join(store.serving_dir(shard), f"{replica}.json")


def write_lease(store: Store, shard: int, replica: str, version_dir: str | None) -> None:
    body = {
        "dir": version_dir,
        "at": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    store.write_bytes(lease_path(store, shard, replica), json.dumps(body).encode())


def drop_lease(store: Store, shard: int, replica: str) -> None:
    store.rm(lease_path(store, shard, replica))


def read_leases(
    store: Store, shard: int, ttl_s: float = LEASE_TTL_S, now: float | None = None
) -> Leases:
    now = time.time() if now is None else now
    out = Leases()
    directory = store.serving_dir(shard)
    for name in store.ls(directory):
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = posixpath.join(directory, name)
        try:
            body = store.read_json(path)
            at = float(body["at"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # replaced or removed while we listed: the next pass reads it
        age = now - at
        if age <= ttl_s:
            if body.get("dir"):
                out.served.add(body["dir"])
                out.fresh[name[:-5]] = body["dir"]
        elif age > STALE_LEASE_FACTOR * ttl_s:
            out.dead.append(path)
    return out
