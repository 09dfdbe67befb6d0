"""One rule for "the newest version that loads" (``index.storage.versions``): the order versions
are tried in, what refuses one, and how long an answer is remembered; and the two users agree on
it: a searcher replica starting while its live version is corrupt serves exactly the version
garbage collection keeps as its anchor, on a local store and on S3 (where GC used to check sizes
only, and so anchored on a live version whose bytes were corrupt)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from harness.stores import write_store
from index.live.rebuild import RebuildOptions, build_shard
from index.storage.gc import collect_garbage, plan_gc
from index.storage.leases import read_leases
from index.storage.manifest import load_manifest
from index.storage.publish import commit_results, list_versions
from index.storage.store import Store
from index.storage.versions import (
    IndexLoadError,
    LoadChecks,
    fallback_order,
    newest_loadable,
    verify_version,
)

DIM = 8
NAMES = [
    "v000001-aaaaaaaa",
    "v000002-cccccccc",
    "v000003-bbbbbbbb",  # live
    "v000003-dddddddd",  # a twin of the live number: lost the commit, never a fallback
    "v000004-eeeeeeee",  # above the live one: a build in progress
    "v000002-ffffffff",
    "not-a-version",
]


def test_fallback_order_is_live_then_older_newest_first():
    order = list(fallback_order("v000003-bbbbbbbb", 3, lambda: NAMES))
    assert order == ["v000003-bbbbbbbb", "v000002-ffffffff", "v000002-cccccccc", "v000001-aaaaaaaa"]

    def unlisted():
        raise AssertionError("listed although the live version loaded")

    found = newest_loadable(fallback_order("v000003-bbbbbbbb", 3, unlisted), lambda n: n.upper())
    assert found == ("v000003-bbbbbbbb", "V000003-BBBBBBBB")


def test_newest_loadable_skips_refusals_and_never_takes_a_failed_read_for_one():
    bad = {"v000003-bbbbbbbb", "v000002-ffffffff"}
    seen = []

    def load(name: str) -> str:
        if name in bad:
            raise IndexLoadError(f"{name}: checksum mismatch")
        return name

    order = fallback_order("v000003-bbbbbbbb", 3, lambda: NAMES)
    found = newest_loadable(order, load, refused=lambda n, e: seen.append(n))
    assert found == ("v000002-cccccccc", "v000002-cccccccc")
    assert seen == ["v000003-bbbbbbbb", "v000002-ffffffff"]
    assert newest_loadable(["v000003-bbbbbbbb"], load) is None

    def unreadable(name: str) -> str:
        raise ConnectionError("the store did not answer")

    with pytest.raises(ConnectionError):
        newest_loadable(order, unreadable)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_kept_a_pass_for_good_a_refusal_for_a_while_a_failed_read_not_at_all():
    store = Store("/nonexistent-store")
    calls: list[str] = []
    outcome = {"v1": "pass", "v2": "refuse", "v3": "unreadable"}

    def verify(_store, _shard, name):
        calls.append(name)
        if outcome[name] == "refuse":
            raise IndexLoadError(f"{name} is corrupt")
        if outcome[name] == "unreadable":
            raise FileNotFoundError(f"{name}: transient")
        return {}

    clock = _Clock()
    checks = LoadChecks(verify, retry_s=60.0, clock=clock)
    assert checks.loads(store, 0, "v1") and checks.loads(store, 0, "v1")
    assert calls == ["v1"]  # a version that passed never changes: checked once
    assert not checks.loads(store, 0, "v2") and not checks.loads(store, 0, "v2")
    assert calls == ["v1", "v2"]  # refused: remembered for retry_s
    clock.now = 61.0
    outcome["v2"] = "pass"  # repaired
    assert checks.loads(store, 0, "v2")
    assert calls == ["v1", "v2", "v2"]
    for _ in range(2):  # a failed read is never remembered, and never counts as a refusal
        with pytest.raises(FileNotFoundError):
            checks.check(store, 0, "v3")
    assert calls.count("v3") == 2
    outcome["v3"] = "pass"
    assert checks.loads(store, 0, "v3")


def _two_versions(store: Store) -> tuple[str, str]:
    """A one-shard store with two committed versions (older good, newer live)."""
    x = np.random.default_rng(0).standard_normal((200, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"r{i:04d}" for i in range(len(x))]
    write_store(store, ids, [f"file:///photos/{i}.jpg" for i in ids], x, 1)
    older = build_shard(store, 0, RebuildOptions(force=True))
    commit_results(store, [older])
    newer = build_shard(store, 0, RebuildOptions(force=True))
    commit_results(store, [newer])
    return older.dir, newer.dir


def _corrupt_keeping_size(store: Store, directory: str, name: str = "vectors.npy") -> None:
    path = f"{store.index_version_dir(0, directory)}/{name}"
    data = bytearray(store.read_bytes(path))
    data[-1] ^= 0xFF  # same size: only the SHA-256 tells
    store.write_bytes(path, bytes(data))


def _anchor(store: Store) -> str | None:
    state = load_manifest(store).shards[0]
    checks = LoadChecks()
    plan = plan_gc(
        state,
        list_versions(store, 0),
        lambda v: checks.check(store, 0, v),
        read_leases(store, 0),
        None,
        {},
        [],
        grace_s=3600.0,
        now=time.time(),
    )
    return plan.anchor


def _served(store: Store) -> str:
    from serve.deployments.shard_holder import ShardHolder

    holder = ShardHolder(store, 0, "test-replica", load_manifest(store))
    assert holder.load_error is None or "IndexLoadError" in holder.load_error
    return holder.view.version_dir


def _agree_on_a_corrupt_live_version(store: Store) -> None:
    older, live = _two_versions(store)
    assert _anchor(store) == live == _served(store)
    assert verify_version(store, 0, live)["count"] == 200
    _corrupt_keeping_size(store, live)
    store.evict_local(store.index_version_dir(0, live))  # a replica on a node without a copy
    with pytest.raises(IndexLoadError, match="checksum mismatch"):
        verify_version(store, 0, live)
    assert _anchor(store) == older == _served(store)
    # GC keeps what the replica serves, and the live version for whoever repairs it
    collect_garbage(store, 0, grace_s=0)
    assert set(list_versions(store, 0)) == {older, live}


def test_replica_and_gc_agree_on_a_local_store(tmp_path):
    _agree_on_a_corrupt_live_version(Store(tmp_path / "store"))


def test_replica_and_gc_agree_on_s3_where_sizes_alone_passed_a_corrupt_version(
    s3_server, s3_store_uri, tmp_path, monkeypatch
):
    monkeypatch.setenv("VISUAL_SEARCH_CACHE", str(tmp_path / "cache"))
    _agree_on_a_corrupt_live_version(Store(s3_store_uri, s3_server.storage_options))
