"""Which versions each replica serves or loads: small lease files that garbage collection reads.

A replica of shard ``s`` writes ``_serving/shard=SSSSS/<replica>.json`` =
``{"dir": <version it serves>, "loading": <version it is fetching, or null>, "at", "host",
"pid"}``: *before* it fetches a version (so a replica that starts, or swaps, holds a lease on
what it is downloading: the download can take minutes), after each swap, and every
``lease_interval_s`` from a thread of its own (``serve.deployments.searcher``), so a load that
runs longer than the TTL never lets its lease lapse. Garbage collection
(``index.storage.gc``) never deletes a version a lease names as served or loading, and never
retires the parts an older named version still needs.

**Whose clock.** A lease's age is judged by the *store's* clock, never the writer's: the reader
writes a probe object next to the leases (``.clock``) and compares the store's own
modification times of the probe and of each lease (S3 ``LastModified``, a file's mtime), so a
replica whose clock runs behind GC's does not look dead. (Only where a backend lists no
modification time does the writer's ``at`` count, against the reader's clock.)

**Doubt keeps.** A lease is *fresh* for ``ttl_s``; a lease that went stale less than
``keep_s`` ago (GC passes its grace period) still keeps what it names, so a replica whose lease
PUTs fail for a while (a store hiccup) is not taken for gone within the grace. A lease file that
is listed but cannot be read or parsed is *unknown*: GC then deletes no version and retires
nothing of that shard until it reads, or until it is older than ``ttl_s + keep_s`` by the
store's clock. A lease older than ``STALE_LEASE_FACTOR`` TTLs belongs to a dead replica and is
removed. What no lease can cover: a replica whose very first lease write fails is invisible
until one succeeds (it logs ``lease_error`` and keeps retrying every interval).

Cost: one small PUT per replica per shard per interval, and one PUT (the probe), one listing
and one GET per replica of the shard when garbage collection looks at that shard (only after a
rebuild, not on every poll).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from index.storage.store import Store

LEASE_INTERVAL_S = 30.0
LEASE_TTL_S = 120.0
STALE_LEASE_FACTOR = 10  # a lease this many TTLs old belongs to a dead replica: delete it
CLOCK_PROBE = ".clock"  # the reader's probe of the store's clock (dot names are not leases)


@dataclass
class Leases:
    served: set[str] = field(default_factory=set)  # version dirs in use: serving or loading
    fresh: dict[str, str] = field(default_factory=dict)  # replica -> the dir it serves (fresh)
    loading: dict[str, str] = field(default_factory=dict)  # replica -> the dir it is loading
    unknown: list[str] = field(default_factory=list)  # lease files listed but not readable
    dead: list[str] = field(default_factory=list)  # paths of long-expired lease files


def lease_path(store: Store, shard: int, replica: str) -> str:
    return posixpath.join(store.serving_dir(shard), f"{replica}.json")


def write_lease(
    store: Store, shard: int, replica: str, version_dir: str | None, loading: str | None = None
) -> None:
    body = {
        "dir": version_dir,
        "loading": loading,
        "at": time.time(),  # informative: readers judge age by the store's clock
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    store.write_bytes(lease_path(store, shard, replica), json.dumps(body).encode())


def drop_lease(store: Store, shard: int, replica: str) -> None:
    store.rm(lease_path(store, shard, replica))


def read_leases(
    store: Store,
    shard: int,
    ttl_s: float = LEASE_TTL_S,
    now: float | None = None,
    keep_s: float = 0.0,
) -> Leases:
    """The shard's leases, aged by the store's clock (see the module docstring). ``now`` (the
    reader's clock) shifts the store's clock by as much as it differs from ``time.time()``:
    tests look into the future with it. ``keep_s``: how long after going stale a lease still
    keeps what it names (GC passes its grace period)."""
    shift = 0.0 if now is None else now - time.time()
    directory = store.serving_dir(shard)
    listed, store_now = _listing_with_clock(store, directory)
    reader_now = time.time() + shift
    out = Leases()
    for name, modified in sorted(listed.items()):
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = posixpath.join(directory, name)
        replica = name[: -len(".json")]
        age = None if modified is None or store_now is None else store_now + shift - modified
        try:
            body = store.read_json(path)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            if age is None:  # no store timestamps: the writer's clock against ours
                age = reader_now - float(body["at"])
        except FileNotFoundError:
            continue  # dropped by its replica (a clean shutdown) while we listed
        except (OSError, ValueError, KeyError, TypeError):
            if age is None or age <= ttl_s + keep_s:
                out.unknown.append(path)  # cannot tell what it names: keep everything
            elif age > STALE_LEASE_FACTOR * ttl_s:
                out.dead.append(path)
            continue
        age = max(age, 0.0)
        serving, loading = body.get("dir"), body.get("loading")
        if age <= ttl_s:
            if serving:
                out.fresh[replica] = serving
            if loading:
                out.loading[replica] = loading
        if age <= ttl_s + keep_s:
            out.served.update(v for v in (serving, loading) if v)
        elif age > STALE_LEASE_FACTOR * ttl_s:
            out.dead.append(path)
    return out


def _listing_with_clock(
    store: Store, directory: str
) -> tuple[dict[str, float | None], float | None]:
    """Names under ``directory`` -> the store's modification time of each (None where the
    backend lists none), and the store's "now": the modification time of a probe written just
    before the listing (None when it could not be written or has no time)."""
    probe = posixpath.join(directory, CLOCK_PROBE)
    try:
        store.write_bytes(probe, b"")
    except OSError:
        probe = None
    try:
        entries = store.fs.ls(directory, detail=True, refresh=True)
    except FileNotFoundError:
        return {}, None
    listed = {
        posixpath.basename(str(e.get("name", "")).rstrip("/")): _modified(e)
        for e in entries
        if e.get("type") != "directory"
    }
    store_now = listed.pop(CLOCK_PROBE, None) if probe is not None else None
    return listed, store_now


def _modified(entry: dict) -> float | None:
    """An fsspec listing entry's modification time as unix seconds (local ``mtime``, S3
    ``LastModified``, GCS ``updated``...), or None."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            return value.timestamp()
    return None
