"""The delta is searched through indexed blocks once it is large (``index.live.delta_blocks``).

A ``LiveShard`` whose delta reaches ``block_rows`` freezes its older rows into an HNSW block
built on a thread and published in the next snapshot. What must hold: recall against the exact
scan of the same live rows, deleted / superseded / filtered rows never returned (masked in the
block, even when deleted after it was built), searches and writes never waiting for a build, a
rebase keeping the blocks, and ``search_exact`` (the canary's reference) staying a scan. Small
dims, a few thousand rows and a low ``block_rows``; no Ray.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import index.live.delta_blocks as delta_blocks
import index.live.snapshot as snapshot
from harness.polling import finishes_within, wait_for
from harness.stores import write_store
from harness.synthetic import gaussian_mixture
from index.ann.exact import exact_search
from index.ann.shard_index import ShardIndex
from index.live.delta import LiveShard
from index.live.parts import write_rows
from index.live.rebuild import RebuildOptions, rebuild_shard
from index.query.filters import Eq, Not
from index.rows import schema
from index.storage.manifest import load_manifest
from index.storage.store import Store

DIM = 32
ROWS = 3000
BLOCK = 1000
PART = 250
QUERIES = 100
WAIT_S = 60.0  # a deadline for a build of a few thousand 32-d rows, on a loaded box
LATER = 2 * ROWS - 2 * PART  # the rebase test's delta rows end here, its base rows start
PROMPT_S = 2.0  # far above what a search or write takes; far below a held build


def _data(seed: int = 0, rows: int = ROWS):
    """``rows`` mixture vectors, their cluster labels and ``QUERIES`` held-out draws."""
    x, labels = gaussian_mixture(rows + QUERIES, DIM, labels=True, clusters=40, seed=seed)
    return x[:rows], labels[:rows], x[rows:]


def _ids(start: int, stop: int) -> list[str]:
    return [f"r{i:05d}" for i in range(start, stop)]


def _add(view: LiveShard, x: np.ndarray, start: int, labels=None, stamp: int = 1) -> None:
    """Rows ``start..`` of ``x`` handed over in parts of ``PART`` (metadata ``cat``: label % 4)."""
    for a in range(0, len(x), PART):
        b = min(len(x), a + PART)
        ids = _ids(start + a, start + b)
        meta = None if labels is None else {"cat": [f"c{c % 4}" for c in labels[a:b]]}
        view.add_rows(f"part-{start + a:05d}", ids, ids, x[a:b], [stamp] * (b - a), meta)


def _settled(view: LiveShard) -> dict:
    """Stats once no build runs: one only starts with ``block_rows`` unfrozen rows, and it keeps
    them unfrozen until it publishes, so fewer unfrozen rows means none is building."""

    def settled() -> dict | None:
        stats = view.stats()
        return stats if stats["delta_rows"] - stats["delta_frozen_rows"] < BLOCK else None

    return wait_for(settled, WAIT_S, "the delta's blocks built", 0.01)


def _recall(got: list[list], want: list[list]) -> float:
    pairs = zip(got, want, strict=True)
    return float(np.mean([len({h.id for h in g} & {h.id for h in w}) / len(w) for g, w in pairs]))


def _prompt(fn, *args):
    """``fn(*args)`` on a thread; (finished within PROMPT_S, its result)."""
    return finishes_within(PROMPT_S, fn, *args)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_blocks_keep_recall_and_scan_only_the_tail(tmp_path, monkeypatch, metric):
    x, _, q = _data(1, ROWS + 300)
    view = LiveShard(Store(tmp_path), 0, None, DIM, metric, block_rows=BLOCK)
    _add(view, x[:ROWS], 0)
    stats = _settled(view)
    assert stats["delta_blocks"] >= 1 and stats["delta_frozen_rows"] > ROWS - BLOCK
    _add(view, x[ROWS:], ROWS)  # an unfrozen tail next to the blocks
    scanned: list[int] = []
    real = exact_search

    def counting(queries, vectors, k, m, **kw):
        scanned.append(len(vectors))
        return real(queries, vectors, k, m, **kw)

    monkeypatch.setattr(delta_blocks, "exact_search", counting)
    monkeypatch.setattr(snapshot, "exact_search", counting)
    got = view.search(q, 10)
    assert sum(scanned) < ROWS, "the blocks were scanned, not searched through their index"
    want = view.search_exact(q, 10)
    assert sum(scanned) >= ROWS + 300  # the reference scans every row
    assert _recall(got, want) >= 0.98
    for query, hits in zip(q, got, strict=True):  # found rows are scored exactly, best first
        vectors = np.stack([view.vector_of(h.id) for h in hits])
        exact = vectors @ query if metric == "ip" else np.square(vectors - query).sum(axis=1)
        scores = [h.score for h in hits]
        assert np.allclose(scores, exact, atol=1e-5)
        assert scores == sorted(scores, reverse=metric == "ip")
    assert any(int(h.id[1:]) >= ROWS for hits in got for h in hits)  # tail rows merge in


def test_deleted_and_superseded_rows_are_masked_in_built_blocks(tmp_path):
    x, _, q = _data(3)
    view = LiveShard(Store(tmp_path), 0, None, DIM, "ip", block_rows=BLOCK)
    _add(view, x, 0)
    _settled(view)
    # after the blocks are built: delete the best rows of every query, move some others
    top = {h.id for hits in view.search_exact(q, 3) for h in hits}
    gone = sorted(top)[::2]
    moved = sorted(top)[1::2]
    view.add_tombstones("tomb-1", gone, [2] * len(gone))
    rows = [int(i[1:]) for i in moved]
    elsewhere = -x[rows]  # the same ids, newer, pointing the other way (in the tail)
    view.add_rows("moved", moved, moved, elsewhere, [2] * len(moved))
    got = view.search(q, 10)
    returned = {h.id for hits in got for h in hits}
    assert not returned & set(gone), "a deleted row came back from a block"
    assert not returned & set(moved), "a superseded row came back from a block"
    assert _recall(got, view.search_exact(q, 10)) >= 0.98
    assert view.search(-x[rows[0]], 1)[0][0].id == moved[0]  # its new copy is found
    # most of the frozen rows deleted: a block with few allowed rows is scanned over them
    many = _ids(0, ROWS)[: int(ROWS * 0.7)]
    view.add_tombstones("tomb-2", many, [3] * len(many))
    got = view.search(q, 10)
    assert not {h.id for hits in got for h in hits} & set(many)
    assert _recall(got, view.search_exact(q, 10)) >= 0.98


def test_a_filter_is_honoured_in_blocks(tmp_path):
    x, labels, q = _data(4)
    view = LiveShard(Store(tmp_path), 0, None, DIM, "ip", block_rows=BLOCK)
    _add(view, x, 0, labels)
    assert _settled(view)["delta_blocks"] >= 1
    cats = np.array([f"c{c % 4}" for c in labels])
    # a quarter of the rows (each block scanned over them), three quarters (HNSW + bitmap)
    for flt, allowed in ((Eq("cat", "c1"), cats == "c1"), (Not(Eq("cat", "c1")), cats != "c1")):
        got = view.search(q, 10, filter=flt, fields=["cat"])
        assert all(
            allowed[int(h.id[1:])] and h.metadata == {"cat": cats[int(h.id[1:])]}
            for hits in got
            for h in hits
        )
        _, truth = exact_search(q, x, 10, "ip", valid=allowed)
        want = [[_ids(j, j + 1)[0] for j in row if j >= 0] for row in truth]
        hits = [len({h.id for h in g} & set(w)) / len(w) for g, w in zip(got, want, strict=True)]
        assert np.mean(hits) >= 0.97


def test_searches_and_writes_do_not_wait_for_a_block_build(tmp_path, monkeypatch):
    x, _, q = _data(5)
    entered, release = threading.Event(), threading.Event()
    real = delta_blocks.build_block

    def held(vectors, metric):
        entered.set()
        release.wait(WAIT_S)
        return real(vectors, metric)

    monkeypatch.setattr(delta_blocks, "build_block", held)
    view = LiveShard(Store(tmp_path), 0, None, DIM, "ip", block_rows=BLOCK)
    try:
        _add(view, x[:BLOCK], 0)  # enough for a block: its build starts and is held
        assert entered.wait(WAIT_S), "no block build started"
        done, got = _prompt(view.search, q, 10)
        assert done, "a search waited for a block build"
        assert got == view.search_exact(q, 10)  # no block yet: the exact scan
        done, _ = _prompt(_add, view, x[BLOCK:], BLOCK)
        assert done, "a write waited for a block build"
        done, _ = _prompt(view.add_tombstones, "tomb", _ids(0, 5), [2] * 5)
        assert done, "a delete waited for a block build"
        assert view.stats()["delta_blocks"] == 0
        done, got = _prompt(view.search, q, 10)
        assert done and got == view.search_exact(q, 10)
    finally:
        release.set()
    stats = _settled(view)
    assert stats["delta_blocks"] >= 1
    got = view.search(q, 10)
    assert not {h.id for hits in got for h in hits} & set(_ids(0, 5))  # deleted mid-build
    assert _recall(got, view.search_exact(q, 10)) >= 0.98


def test_a_rebase_keeps_the_blocks_and_their_rows(tmp_path, monkeypatch):
    x, _, q = _data(6, 2 * ROWS)
    base_ids = [f"b{i:04d}" for i in range(200)]
    store = write_store(tmp_path / "s", base_ids, base_ids, x[LATER:], 1)
    rebuild_shard(store, 0)

    def write(start: int, stop: int) -> None:
        for a in range(start, stop, PART):
            ids = _ids(a, a + PART)
            write_rows(store, 0, schema.embeddings_table(ids, ids, x[a : a + PART]))

    first = ShardIndex.load(store, 0, load_manifest(store).shards[0].dir)
    old = LiveShard(store, 0, first, DIM, "ip", block_rows=BLOCK)
    write(0, ROWS)  # the next version covers these
    rebuild_shard(store, 0, RebuildOptions(force=True))
    write(ROWS, LATER)  # written after that build: they stay delta rows
    old.refresh()
    frozen = _settled(old)["delta_frozen_rows"]
    assert frozen > ROWS  # blocks hold rows of both kinds
    builds: list[int] = []
    real = delta_blocks.build_block
    monkeypatch.setattr(
        delta_blocks, "build_block", lambda v, m: builds.append(len(v)) or real(v, m)
    )
    base = ShardIndex.load(store, 0, load_manifest(store).shards[0].dir)
    new = old.rebased(base)
    stats = new.stats()
    assert stats["delta_rows"] == LATER - ROWS  # only the rows the new version does not cover
    assert stats["delta_blocks"] >= 1 and stats["delta_frozen_rows"] == frozen - ROWS
    assert stats["delta_frozen_rows"] > 0 and not builds  # the old indexes, not rebuilt
    for j in range(ROWS, frozen, 97):  # frozen rows are found, as themselves
        assert new.search(x[j], 1)[0][0].id == _ids(j, j + 1)[0]
    assert new.search(x[5], 1)[0][0].id == _ids(5, 6)[0]  # a covered row: from the base
    assert _recall(new.search(q, 10), new.search_exact(q, 10)) >= 0.98
    doomed = _ids(ROWS, ROWS + 50)
    new.add_tombstones("tomb", doomed, [schema.now_ms().value + 10] * 50)
    assert all(new.search(x[j], 1)[0][0].id not in doomed for j in range(ROWS, ROWS + 50, 7))


def test_search_exact_never_uses_the_blocks(tmp_path, monkeypatch):
    x, _, q = _data(7)
    view = LiveShard(Store(tmp_path), 0, None, DIM, "l2", block_rows=BLOCK)
    _add(view, x, 0)
    assert _settled(view)["delta_blocks"] >= 1
    gone = _ids(0, ROWS)[::3]
    view.add_tombstones("tomb", gone, [2] * len(gone))

    def broken(*args, **kwargs):
        raise AssertionError("searched a block")

    monkeypatch.setattr(snapshot, "search_frozen", broken)
    live = np.ones(ROWS, bool)
    live[::3] = False
    _, truth = exact_search(q, x.astype(np.float16).astype(np.float32), 10, "l2", valid=live)
    want = [[_ids(j, j + 1)[0] for j in row] for row in truth]
    assert [[h.id for h in hits] for hits in view.search_exact(q, 10)] == want
    with pytest.raises(AssertionError, match="searched a block"):
        view.search(q, 10)
