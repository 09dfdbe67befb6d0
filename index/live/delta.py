"""A shard as it is *now*: its live index version, plus the rows added since, minus deletes.

Three things make up the live view of one shard (``LiveShard``): the **base**, the live
``ShardIndex`` version (IVF+PQ or Flat) the manifest names; the **delta**, every row of a
``part-*`` under ``embeddings/shard=NNNNN/`` the base does not cover
(``index.storage.coverage.covered_parts``: rows written by ``POST /images`` through
``index.live.parts``, or by a re-run of the embedding job), held in memory as float32 (rounded
through float16 as the base stores them, so a row scores the same before and after the rebuild
that folds it in), searched exactly (``index.ann.exact``) until ``block_rows`` of them are
frozen into indexed blocks (``index.live.delta_blocks``); the **tombstones**,
``tombstones/shard=NNNNN/part-*.parquet`` rows ``(id, deleted_at)`` and the deletes the base
applied (its ``tombstones.parquet``).

Which copy of an id is seen is decided by ``index.rows.visibility`` (newest ``ingested_at`` wins; a
tombstone hides rows it is at least as new as), applied here one part at a time: a delta row
hides the base row of its id when it is at least as new; a tombstone the base did not apply
hides the base row it is at least as new as, and any tombstone hides the delta rows it is at
least as new as. Hidden base rows are excluded inside FAISS with an ``IDSelector`` over their row
keys, so a search still returns ``k`` visible rows. Base hits (reranked) and delta hits (exact
scores) are merged by ``index.query.merge.merge_topk``.

Refreshing is incremental: ``refresh`` lists the two folders (fresh listings,
``index.storage.store``) and reads only part files it has not seen, each on its own: a part
that cannot be read is retried by the next refresh while the others are published (a failed
tombstone part holds back new row parts only, never other deletes); a writer in the same
process hands its rows over directly (``add_rows``, ``add_tombstones``) so they are searchable
before its HTTP response returns. ``rebased`` carries the delta rows, their blocks and the
tombstones over to a newly built base version, dropping rows it covers. With a store transform
(``index.ann.transform``) rows and queries are reduced as they arrive.

Metadata: delta rows keep their columns in ``index.rows.columns.GrowingColumns``. A filtered
``search`` evaluates the filter on the base's columns (``ShardIndex.search_filtered``) and on the
delta's (masking the rows it rejects); ``fields`` names the columns each hit carries,
``record_of`` returns all of them, ``facets`` what each column holds. Mutations hold a lock;
searches read one immutable ``Snapshot`` (``snapshot()``, ``index.live.snapshot``; a group's
search too, ``index.live.group_search``), so a search never sees a half-applied change nor waits
for a refresh or a block build; each checks its queries and ``k`` (``index.ann.queries``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from index.ann.filter_plan import FilterPlan
from index.ann.queries import check_k, check_queries
from index.ann.shard_index import ShardIndex
from index.ann.transform import Transform, in_store_space
from index.live.delta_blocks import Freezer, block_rows_for
from index.live.parts import read_each, read_rows, read_tombstones
from index.live.snapshot import (
    Snapshot,
    exclude_selector,
    merged,
    row_record,
    search_base,
    search_delta,
    snapshot_facets,
    snapshot_stats,
)
from index.query.filters import Filter
from index.query.hits import Hit
from index.rows.columns import GrowingColumns, rows_table
from index.rows.visibility import hides, supersedes
from index.storage.coverage import applied_tombstones, covered_parts
from index.storage.store import Store
from index.storage.versions import TOMBSTONES_FILE

__all__ = ["LiveShard", "load_live_shard"]

log = logging.getLogger(__name__)

_INITIAL_CAPACITY = 256
_NO_KEYS = np.zeros(0, np.int64)
_BULK_LOOKUP = 64  # parts with more rows look their ids up in the base in one hash join


class LiveShard:
    """One shard's base version + delta + tombstones; ``search`` and ``vector_of`` see them all."""

    def __init__(
        self,
        store: Store,
        shard: int,
        base: ShardIndex | None,
        dim: int,
        metric: str,
        block_rows: int | None = None,  # tail rows frozen into a block; None: block_rows_for(dim)
        transform: Transform | None = None,  # the store's (index.ann.transform); None: none
    ) -> None:
        self.source_dim = dim  # the model's: rows and queries arrive in it (load_transform checks)
        self.transform = transform
        dim = dim if transform is None else transform.out_dim  # the space rows are indexed in
        if base is not None and (base.dim != dim or base.metric != metric):
            raise ValueError(f"base is {base.dim}-d {base.metric}, shard is {dim}-d {metric}")
        self.store = store
        self.shard = shard
        self.base = base
        self.dim = dim
        self.metric = metric
        meta = base.meta if base is not None else {}
        self.covered: frozenset[str] = frozenset(covered_parts(meta))
        self.applied_tombstones: frozenset[str] = frozenset(applied_tombstones(meta))
        self._lock = threading.RLock()
        # delta rows (append-only buffer; rows are marked dead, never removed)
        self._buf = np.zeros((0, dim), np.float32)
        self._n = 0
        self._ids: list[str] = []
        self._uris: list[str] = []
        self._ingested: list[int] = []
        self._alive = np.zeros(0, bool)
        self._meta = GrowingColumns()  # the delta rows' metadata columns
        self._newest: dict[str, int] = {}  # id -> its newest delta row
        self._part_rows: dict[str, tuple[int, int]] = {}  # delta part -> [start, stop) rows
        # tombstones
        self._deleted: dict[str, int] = {}  # id -> newest deleted_at (ms), every tombstone
        self._tomb_parts: dict[str, tuple[list[str], np.ndarray]] = {}
        self._hidden_keys: set[int] = set()
        self._unreadable: dict[str, str] = {}  # part -> why the last refresh could not read it
        rows = block_rows_for(dim) if block_rows is None else block_rows
        self._freezer = Freezer(metric, self._lock, self._publish, rows)
        self._snap = self._snapshot(rebuild_selector=True)
        if base is not None and TOMBSTONES_FILE in (meta.get("files") or {}):
            ids, deleted = read_tombstones(None, str(base.directory / TOMBSTONES_FILE))
            with self._lock:  # the base applied these: they only hide delta rows
                self._add_tombstones(f"{base.name}/{TOMBSTONES_FILE}", ids, deleted, True)
                self._publish()

    # ---- reading the store --------------------------------------------------------------------
    def refresh(self) -> int:
        """Read embedding and tombstone parts not seen yet; returns how many parts were applied.

        Each part is read on its own: one that cannot be read (a transient GET error, a torn
        or foreign file) is left unseen, named in ``stats()["unreadable_parts"]`` and tried again
        by the next refresh, and the others are published now. Deletes are never undone by
        this: while a listed tombstone part cannot be read, newly listed row parts wait with it
        (they could hold rows it hides), and tombstones that read are applied at once."""
        parts = [
            p
            for p in self.store.list_parts(self.shard)
            if p not in self.covered and p not in self._part_rows
        ]
        tombs = [
            p for p in self.store.list_tombstone_parts(self.shard) if p not in self._tomb_parts
        ]
        failed: dict[str, str] = {}
        loaded_tombs = read_each(self.store, tombs, read_tombstones, failed)
        loaded_rows = [] if failed else read_each(self.store, parts, read_rows, failed)
        applied = 0
        with self._lock:
            for part, (ids, deleted) in loaded_tombs:
                self._add_tombstones(part, ids, deleted, part in self.applied_tombstones)
                applied += 1
            for part, (ids, uris, vectors, ingested, meta) in loaded_rows:
                try:
                    self._add_rows(
                        part, ids, uris, in_store_space(vectors, self.transform), ingested, meta
                    )
                except ValueError as e:  # rows that do not fit (lengths, metadata): this part
                    failed[part] = f"{type(e).__name__}: {e}"
                    continue
                applied += 1
            if applied:
                self._publish()
            self._unreadable = failed
        if failed:
            log.warning(
                "shard %d: %d part(s) unreadable, tried again next refresh%s: %s",
                self.shard,
                len(failed),
                " (new row parts wait for the tombstones)" if len(loaded_rows) < len(parts) else "",
                "; ".join(f"{p}: {e}" for p, e in sorted(failed.items())[:3]),
            )
        return applied

    def add_rows(
        self,
        part: str,
        ids: list[str],
        uris: list[str],
        vectors: np.ndarray,
        ingested_at_ms: np.ndarray | list[int],
        metadata: pa.Table | Mapping[str, Sequence] | None = None,
    ) -> None:
        """Rows its writer just wrote durably as ``part`` (relative path): searchable on return.
        ``metadata``: their metadata columns, as written (a table, or column -> values)."""
        if metadata is not None and not isinstance(metadata, pa.Table):
            metadata = pa.table(dict(metadata)) if metadata else None
        with self._lock:
            ingested = np.asarray(ingested_at_ms, np.int64)
            vectors = in_store_space(vectors, self.transform)
            self._add_rows(part, ids, uris, vectors, ingested, metadata)
            self._publish()

    def add_tombstones(self, part: str, ids: list[str], deleted_at_ms: np.ndarray | list[int]):
        """Tombstones its writer just wrote durably as ``part``: hidden on return."""
        with self._lock:
            self._add_tombstones(
                part, ids, np.asarray(deleted_at_ms, np.int64), part in self.applied_tombstones
            )
            self._publish()

    def rebased(self, base: ShardIndex) -> LiveShard:
        """A view over a new base version with what it does not cover (delta rows of parts it was
        not built from) and every tombstone (``carry_into``); the caller swaps it in."""
        block_rows = self._freezer.block_rows
        new = LiveShard(
            self.store, self.shard, base, self.source_dim, self.metric, block_rows, self.transform
        )
        self.carry_into(new)
        return new

    def carry_into(self, new: LiveShard) -> int:
        """Apply to unpublished ``new`` the parts it lacks (none its base covers, nor the old base's
        deletes); returns how many. Only copying slices holds this lock: stamps never wait."""
        with self._lock:
            meta, parts = self._meta.snapshot(self._n), dict(self._part_rows)
            blocks = self._freezer.blocks
            rows = [
                (part, a, b, self._ids[a:b], self._uris[a:b], self._buf[a:b], self._ingested[a:b])
                for part, (a, b) in self._part_rows.items()
                if part not in new.covered and part not in new._part_rows
            ]
            tombs = [
                (part, ids, deleted)
                for part, (ids, deleted) in self._tomb_parts.items()
                if "/" + TOMBSTONES_FILE not in part and part not in new._tomb_parts
            ]
        with new._lock:
            fresh = new._n == 0  # the old blocks' rows will be its first: they keep their index
            for part, a, b, ids, uris, vectors, t in rows:
                t, metadata = np.asarray(t, np.int64), rows_table(meta, a, b)
                new._add_rows(part, ids, uris, vectors, t, metadata)
            for part, ids, deleted in tombs:
                new._add_tombstones(part, ids, deleted, part in new.applied_tombstones)
            if fresh:
                new._freezer.adopt(blocks, parts, new._part_rows)
            new._publish()
        return len(rows) + len(tombs)

    # ---- mutations (hold the lock) ------------------------------------------------------------
    def _base_keys(self, ids: list[str]) -> list[int | None]:
        if self.base is None:
            return [None] * len(ids)
        if len(ids) > _BULK_LOOKUP:
            return [None if k < 0 else int(k) for k in self.base.row_keys(ids)]
        return [self.base.row_key(i) for i in ids]

    def _add_rows(self, part, ids, uris, vectors, ingested, meta=None) -> None:
        if part in self._part_rows or part in self.covered:
            return  # already here (a writer's hand-over and the poll raced)
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.dim)
        n = len(ids)
        if not (len(uris) == n == len(vectors) == len(ingested)):
            raise ValueError("ids, uris, vectors and ingested_at differ in length")
        if meta is not None and meta.num_rows != n:
            raise ValueError(f"{meta.num_rows} rows of metadata for {n} rows")
        self._meta.append(meta, n)  # first: it may raise; the rows below never half-apply
        self._reserve(self._n + n)
        start = self._n
        # float16 rounding: the same numbers the base version will hold after a rebuild
        self._buf[start : start + n] = vectors.astype(np.float16).astype(np.float32)
        self._ids.extend(ids)
        self._uris.extend(uris)
        self._ingested.extend(int(t) for t in ingested)
        self._n += n
        self._part_rows[part] = (start, start + n)
        alive = self._alive
        for row, key in zip(range(start, start + n), self._base_keys(list(ids)), strict=True):
            row_id, t = self._ids[row], self._ingested[row]
            visible = not hides(self._deleted.get(row_id), t)
            old = self._newest.get(row_id)
            if old is not None and not supersedes(t, self._ingested[old]):
                alive[row] = False  # an older copy arrived late: the newer row stays
                continue
            if old is not None:
                alive[old] = False
            self._newest[row_id] = row
            if key is not None:
                if supersedes(t, self.base.ingested_at(key)):
                    self._hidden_keys.add(key)
                else:
                    visible = False  # the base holds a newer copy of this id
            alive[row] = visible

    def _add_tombstones(self, part, ids, deleted, applied: bool) -> None:
        if part in self._tomb_parts:
            return
        self._tomb_parts[part] = (list(ids), np.asarray(deleted, np.int64))
        keys = [None] * len(ids) if applied else self._base_keys(list(ids))
        for row_id, t, key in zip(ids, deleted, keys, strict=True):
            t = int(t)
            if t > self._deleted.get(row_id, -1):
                self._deleted[row_id] = t
            row = self._newest.get(row_id)
            if row is not None and hides(t, self._ingested[row]):
                self._alive[row] = False
            if key is not None and hides(t, self.base.ingested_at(key)):
                self._hidden_keys.add(key)

    def _reserve(self, rows: int) -> None:
        if rows <= len(self._buf):
            return
        capacity = max(_INITIAL_CAPACITY, 2 * len(self._buf), rows)
        buf = np.zeros((capacity, self.dim), np.float32)
        buf[: self._n] = self._buf[: self._n]
        alive = np.zeros(capacity, bool)
        alive[: self._n] = self._alive[: self._n]
        self._buf, self._alive = buf, alive  # old snapshots keep the old arrays

    def _publish(self) -> None:
        self._snap = self._snapshot(
            rebuild_selector=len(self._hidden_keys) != self._snap.hidden_base_count
        )
        self._freezer.due(self._buf, self._n)  # a block of the tail, built off this lock

    def _snapshot(self, rebuild_selector: bool) -> Snapshot:
        exclude = None if rebuild_selector else self._snap.exclude
        hidden = _NO_KEYS if rebuild_selector else self._snap.hidden
        if rebuild_selector and self._hidden_keys:
            keys = np.fromiter(self._hidden_keys, np.int64, len(self._hidden_keys))
            keys.sort()
            exclude = exclude_selector(keys)
            hidden = keys
        alive = self._alive[: self._n].copy()
        return Snapshot(
            base=self.base,
            exclude=exclude,
            hidden_base_count=len(self._hidden_keys),
            hidden=hidden,
            vectors=self._buf[: self._n],
            ids=self._ids,
            uris=self._uris,
            alive=alive,
            alive_count=int(alive.sum()),
            meta=self._meta.snapshot(self._n),
            blocks=self._freezer.blocks,
            frozen=self._freezer.frozen,
        )

    # ---- reading ------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return self._snap

    def search(self, queries: np.ndarray, k: int, **options) -> list[list[Hit]]:
        """Top ``k`` visible rows per query over base (reranked) and delta (exact), merged;
        ``options`` are ``search_with_plan``'s (nprobe, candidates, rerank, filter, fields)."""
        return self.search_with_plan(queries, k, **options)[0]

    def search_with_plan(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        candidates: int | None = None,
        rerank: bool = True,
        filter: Filter | None = None,  # noqa: A002 (the API's word)
        fields: Sequence[str] | None = None,
    ) -> tuple[list[list[Hit]], FilterPlan | None]:
        """The top ``k`` hits per query, and the plan of the base's filtered search (None
        without a filter). ``filter`` (``index.query.filters``, checked against the store's
        schema) restricts the hits to the rows it matches; ``fields`` names the metadata columns
        each hit carries (``Hit.metadata``)."""
        snap = self._snap
        q = check_queries(in_store_space(queries, self.transform), self.dim)
        check_k(k)
        options = {"nprobe": nprobe, "candidates": candidates, "rerank": rerank}
        base_hits, plan = search_base(snap, q, k, filter, fields, **options)
        delta_hits = search_delta(snap, q, k, self.metric, self.shard, filter, fields)
        return merged(base_hits, delta_hits, k, self.metric), plan

    def search_exact(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Brute-force top ``k`` of the visible rows (base rows not hidden + live delta): what
        ``search`` answers with a perfect index. The recall canary's reference
        (``serve.deployments.canary``): scans every vector of the shard, never the delta blocks."""
        snap = self._snap
        q = check_queries(in_store_space(queries, self.transform), self.dim)
        check_k(k)
        base_hits: list[list[Hit]] = [[] for _ in range(len(q))]
        if snap.base is not None:
            with self._lock:
                hidden = {snap.base.id_of(key) for key in self._hidden_keys}
            found = snap.base.search_exact(q, k + len(hidden))
            base_hits = [[h for h in hits if h.id not in hidden][:k] for hits in found]
        delta_hits = search_delta(snap, q, k, self.metric, self.shard, blocks=False)
        return merged(base_hits, delta_hits, k, self.metric)

    def vector_of(self, row_id: str) -> np.ndarray | None:
        """The visible vector of ``row_id`` (delta first, then base), or None: in the store's
        space (reduced, with a transform), which ``search`` takes as it is."""
        found = self._locate(row_id)
        if found is None:
            return None
        snap, where, index = found
        if where == "delta":
            return snap.vectors[index].copy()
        return snap.base.vector_of(row_id)

    def newest_stamp(self, ids: Sequence[str]) -> int:
        """The newest stamp this view knows for any of ``ids`` (a row's ``ingested_at``, delta or
        base, visible or not, or a ``deleted_at``); -1 for none. The next write of these ids is
        stamped after it (``index.rows.clock.stamp_after``)."""
        snap, newest = self._snap, -1
        with self._lock:
            for row_id in ids:
                row = self._newest.get(row_id)
                key = snap.base.row_key(row_id) if snap.base is not None else None
                row_ms = -1 if row is None else self._ingested[row]
                base_ms = -1 if key is None else int(snap.base.ingested_at(key))
                newest = max(newest, row_ms, self._deleted.get(row_id, -1), base_ms)
        return newest

    def record_of(self, row_id: str, fields: Sequence[str] | None = None) -> dict | None:
        """The visible row ``row_id`` as ``{"id", "uri", "shard", "version", "source",
        "ingested_at_ms", "metadata"}`` (``source``: "delta" or "index"; ``metadata``: the
        ``fields`` asked, default every column the row's version or the delta holds), or None
        when no visible row has that id (``GET /images/{id}``)."""
        found = self._locate(row_id)
        if found is None:
            return None
        snap, where, index = found
        ingested = self._ingested[index] if where == "delta" else None
        return row_record(snap, row_id, where, index, ingested, fields, self.shard, self.version)

    def _locate(self, row_id: str) -> tuple[Snapshot, str, int] | None:
        """Where the visible copy of ``row_id`` is: (snapshot, "delta" or "base", row)."""
        snap = self._snap
        key = snap.base.row_key(row_id) if snap.base is not None else None
        with self._lock:
            row = self._newest.get(row_id)
            base_hidden = key is not None and key in self._hidden_keys
        if row is not None and row < len(snap.alive) and snap.alive[row]:
            return snap, "delta", row
        if key is None or base_hidden:
            return None
        return snap, "base", key

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        return None if self.base is None else self.base.version

    @property
    def version_dir(self) -> str | None:
        return None if self.base is None else self.base.name

    @property
    def meta(self) -> dict:
        return {} if self.base is None else self.base.meta

    def memory_bytes(self) -> int:
        """The base version's RAM (``ShardIndex.memory_bytes``), the delta's buffers and blocks."""
        base = 0 if self.base is None else self.base.memory_bytes()
        return base + int(self._buf.nbytes) + self._meta.nbytes + self._freezer.nbytes

    def fetch_size(self, k: int, candidates: int | None = None, rerank: bool = True) -> int:
        """Rows taken from the compressed base index for a top-``k`` search (0 without one)."""
        return 0 if self.base is None else self.base.fetch_size(k, candidates, rerank)

    @property
    def count(self) -> int:
        """Visible rows: base rows not hidden + live delta rows."""
        snap = self._snap
        base = 0 if snap.base is None else snap.base.count - snap.hidden_base_count
        return base + snap.alive_count

    def facets(self) -> dict:
        return snapshot_facets(self._snap)  # index.query.facets over the visible rows

    def stats(self) -> dict:
        return {
            **snapshot_stats(self._snap),
            "delta_parts": len(self._part_rows),
            "delta_block_error": self._freezer.error,  # a failed build: no more blocks, exact
            "tombstones": len(self._deleted),
            "unreadable_parts": dict(self._unreadable),  # retried by every refresh
        }


def load_live_shard(
    store: Store,
    shard: int,
    version: str | int | None,
    dim: int,
    metric: str,
    transform: Transform | None = None,
) -> LiveShard:
    """The live view of ``shard`` at ``version`` (a name or number; None: delta only), read;
    ``dim`` is the model's, ``transform`` the store's (``index.ann.transform``)."""
    base = ShardIndex.load(store, shard, version) if version is not None else None
    view = LiveShard(store, shard, base, dim, metric, transform=transform)
    view.refresh()
    return view
