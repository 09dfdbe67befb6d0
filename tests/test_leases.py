"""Leases under slow loads, failed lease writes and skewed clocks (REVIEW-9d94e46 1.2, 1.6/1.7).

A replica must hold a lease on the version it is *loading* (GC would delete it under a fresh
replica's download otherwise), renew its leases while a load runs longer than the TTL, and stay
visible to GC for a grace period when its lease writes fail or its clock is behind; a long swap of
one shard must not stop delta polls of the group's other shards.

The replica reads the store through ``GatedFS``, a test-only fsspec filesystem: the local disk
under a non-local protocol, so versions are fetched into the node cache as from an object store,
with a gate that holds those fetches until the test opens it. A load is then really in progress
(blocked inside the download) for as long as the test needs, with no sleep deciding anything.
GC, builds and other writers use a plain local ``Store`` on the same root (other processes).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from harness.stores import write_store
from index.live.parts import write_rows
from index.live.rebuild import RebuildOptions, rebuild_shard
from index.rows import schema
from index.storage.gc import collect_garbage
from index.storage.leases import lease_path, read_leases
from index.storage.manifest import load_manifest
from index.storage.publish import list_versions
from index.storage.store import Store
from serve.deployments.searcher import ShardSearcher

DIM = 16
WAIT_S = 30.0


class GatedFS(LocalFileSystem):
    """The local disk as a remote store (``gatedfile://``): version fetches wait for ``gate``
    while ``armed``; lease writes fail while ``fail_lease_writes``."""

    protocol = ("gatedfile",)
    armed = False
    gate = threading.Event()
    entered = threading.Event()  # a fetch is waiting at the gate
    fail_lease_writes = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "auto_mkdir": True})  # no folders on object stores

    def get_file(self, path1, path2, callback=None, **kwargs):
        if GatedFS.armed and "/indexes/" in str(path1):
            GatedFS.entered.set()
            if not GatedFS.gate.wait(WAIT_S * 2):
                raise TimeoutError("the test never opened the gate")
        return super().get_file(path1, path2, callback=callback, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        """A whole object or nothing, as an object store's PUT (the local write is not)."""
        path = self._strip_protocol(path)
        if GatedFS.fail_lease_writes and "/_serving/" in path:
            raise PermissionError(f"lease writes refused (test): {path}")
        if mode == "create" and os.path.exists(path):
            raise FileExistsError(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        os.replace(tmp, path)


@pytest.fixture
def gated(tmp_path, monkeypatch):
    """(plain store, gated URI of the same root): two shards, each with a live version."""
    fsspec.register_implementation("gatedfile", GatedFS, clobber=True)
    monkeypatch.setenv("VISUAL_SEARCH_CACHE", str(tmp_path / "cache"))
    GatedFS.armed, GatedFS.fail_lease_writes = False, False
    GatedFS.gate.clear()
    GatedFS.entered.clear()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"r{i:04d}" for i in range(len(x))]
    store = write_store(tmp_path / "s", ids, ids, x, 2)
    for shard in (0, 1):
        rebuild_shard(store, shard)
    yield store, f"gatedfile://{store.root}"
    GatedFS.gate.set()  # never leave a loader blocked
    GatedFS.armed, GatedFS.fail_lease_writes = False, False


def searcher_of(uri: str, shards, **kwargs) -> ShardSearcher:
    kwargs = {"reload_interval_s": 0, "delta_poll_s": 0, "lease_interval_s": 0.1, **kwargs}
    return ShardSearcher.func_or_class(uri, shards, **kwargs)


def stop(searcher: ShardSearcher) -> None:
    close = getattr(searcher, "_close", None)
    close() if close else searcher._stop.set()


def wait_for(predicate, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def new_version(store: Store, shard: int, tag: str) -> str:
    """A row added and the shard rebuilt: a new live version (what another builder commits)."""
    vector = np.ones((1, DIM), np.float32) / np.sqrt(DIM)
    write_rows(store, shard, schema.embeddings_table([tag], [tag], vector))
    assert rebuild_shard(store, shard, RebuildOptions(force=True))["built"]
    return load_manifest(store).shards[shard].dir


def live(store: Store, shard: int) -> str:
    return load_manifest(store).shards[shard].dir


def test_gc_keeps_the_version_a_starting_replica_is_still_loading(gated):
    """1.2 (a): a replica leases the version it loads before fetching it. Here its download
    of V1 is in progress when V2 commits and GC runs past its grace: V1 stays, and the
    replica finishes loading it and serves."""
    store, uri = gated
    v1 = live(store, 0)
    GatedFS.armed = True
    made: dict = {}
    starting = threading.Thread(
        target=lambda: made.setdefault("searcher", searcher_of(uri, [0])), daemon=True
    )
    starting.start()
    try:
        assert GatedFS.entered.wait(WAIT_S), "the replica never started fetching"
        v2 = new_version(store, 0, "late")
        summary = collect_garbage(store, 0, grace_s=0)
        assert v1 in list_versions(store, 0), f"GC deleted the version being loaded: {summary}"
        assert summary["versions"] == [] and summary["waiting"]
        assert read_leases(store, 0).served >= {v1}
    finally:
        GatedFS.gate.set()
        starting.join(WAIT_S)
    searcher = made["searcher"]
    try:
        assert searcher.holders[0].view.version_dir == v1  # the load completed, intact
        assert searcher.holders[0].loading is None
        lease = store.read_json(lease_path(store, 0, searcher.replica))
        assert lease["dir"] == v1 and lease["loading"] is None
        assert v2 != v1
    finally:
        stop(searcher)


def test_leases_are_renewed_while_a_swap_runs_longer_than_the_ttl(gated):
    """1.2 (b): renewal has its own thread. A swap blocked in its download for several TTLs
    keeps the lease fresh, naming both the served version and the one loading."""
    store, uri = gated
    ttl = 1.0
    searcher = searcher_of(uri, [0, 1], reload_interval_s=0.1, delta_poll_s=0.1)
    try:
        v1 = live(store, 0)
        GatedFS.armed = True
        v2 = new_version(store, 0, "next")
        assert GatedFS.entered.wait(WAIT_S), "the swap never started fetching"
        renewals: set[float] = set()
        started = time.monotonic()
        while time.monotonic() - started < 3.5 * ttl:  # the load runs for more than 3 TTLs
            leases = read_leases(store, 0, ttl_s=ttl)
            assert leases.fresh.get(searcher.replica) == v1, "the lease lapsed during the load"
            renewals.add(store.read_json(lease_path(store, 0, searcher.replica))["at"])
            time.sleep(0.05)  # pacing of the checks, not synchronisation
        assert len(renewals) >= 3
        assert leases.loading.get(searcher.replica) == v2  # and it names the version loading
        assert {v1, v2} <= leases.served
        GatedFS.gate.set()
        wait_for(lambda: searcher.holders[0].view.version_dir == v2, "the swap to finish")
        wait_for(
            lambda: read_leases(store, 0, ttl_s=ttl).loading.get(searcher.replica) is None,
            "the lease to stop naming a load",
        )
    finally:
        stop(searcher)


def test_a_long_swap_of_one_shard_does_not_stop_delta_polls_of_the_others(gated):
    """1.6/1.7: each shard polls on its own thread: while shard 0's swap is blocked in its
    download, a row another writer adds to shard 1 becomes searchable on this replica."""
    store, uri = gated
    searcher = searcher_of(uri, [0, 1], reload_interval_s=0.1, delta_poll_s=0.1)
    try:
        GatedFS.armed = True
        new_version(store, 0, "swap-me")
        assert GatedFS.entered.wait(WAIT_S), "the swap never started fetching"
        vector = np.full((1, DIM), -1.0, np.float32) / np.sqrt(DIM)
        write_rows(store, 1, schema.embeddings_table(["other-writer"], ["u"], vector))
        wait_for(
            lambda: searcher.holders[1].view.vector_of("other-writer") is not None,
            "shard 1's delta poll while shard 0 swaps",
            timeout=10,
        )
        assert searcher.holders[0].loading is not None  # shard 0 was still loading all along
    finally:
        GatedFS.gate.set()
        stop(searcher)


def test_gc_keeps_a_replica_whose_lease_writes_fail_until_the_grace_ends(gated):
    """1.2 (c): a replica whose lease PUTs fail is not taken for gone within the grace: a
    lease that went stale less than ``grace_s`` ago keeps its version; after that it does not."""
    store, uri = gated
    searcher = searcher_of(uri, [0])
    try:
        v1 = live(store, 0)
        GatedFS.fail_lease_writes = True
        wait_for(lambda: searcher.holders[0].lease_error is not None, "a failed lease write")
        assert searcher.stats()[0]["lease_error"].startswith("PermissionError")
        new_version(store, 0, "newer")
        # 31 s on: GC's grace (30 s) has passed since the commit, the replica's last lease
        # (written before its writes failed) is past its TTL (10 s) but stale for < the grace
        soon = collect_garbage(store, 0, grace_s=30, lease_ttl_s=10, now=time.time() + 31)
        assert soon["versions"] == [] and v1 in list_versions(store, 0), soon
        later = collect_garbage(store, 0, grace_s=30, lease_ttl_s=10, now=time.time() + 100)
        assert later["versions"] == [v1]  # TTL + grace later: the replica is taken for gone
    finally:
        GatedFS.fail_lease_writes = False
        stop(searcher)


def test_lease_age_is_the_stores_clock_not_the_writers(gated):
    """1.2 (c): a replica whose clock runs ten minutes behind GC's writes leases whose ``at``
    looks stale; the store's own timestamp says it was just written, and GC keeps its version."""
    store, _ = gated
    old = live(store, 0)
    body = {"dir": old, "loading": None, "at": time.time() - 600, "host": "h", "pid": 1}
    store.write_bytes(lease_path(store, 0, "slow-clock"), json.dumps(body).encode())
    new_version(store, 0, "newer")
    assert read_leases(store, 0).fresh == {"slow-clock": old}
    summary = collect_garbage(store, 0, grace_s=0)
    assert summary["versions"] == [] and old in list_versions(store, 0), summary


def test_lease_age_on_s3_is_its_last_modified(s3_server):
    """The same rule on an object store: S3's ``LastModified`` against the probe's."""
    store = Store(f"{s3_server.new_bucket()}/store", s3_server.storage_options)
    body = {"dir": "v000001-aaaaaaaa", "loading": "v000002-bbbbbbbb", "at": time.time() - 600}
    store.write_bytes(lease_path(store, 0, "slow-clock"), json.dumps(body).encode())
    leases = read_leases(store, 0)
    assert leases.fresh == {"slow-clock": "v000001-aaaaaaaa"}
    assert leases.served == {"v000001-aaaaaaaa", "v000002-bbbbbbbb"}
    assert read_leases(store, 0, ttl_s=60, now=time.time() + 120).served == set()  # expires


def test_an_unreadable_lease_stops_collection_until_it_is_old(gated):
    """A lease file that is listed but cannot be parsed may name any version: GC deletes no
    version and retires nothing of the shard until it is older than TTL + grace."""
    store, _ = gated
    old = live(store, 0)
    store.write_bytes(lease_path(store, 0, "torn"), b"{not json")
    new_version(store, 0, "newer")
    summary = collect_garbage(store, 0, grace_s=0)
    assert summary["versions"] == [] and "unreadable" in summary["waiting"], summary
    assert old in list_versions(store, 0)
    later = collect_garbage(store, 0, grace_s=0, now=time.time() + 3600)
    assert later["versions"] == [old]
