"""What one search of a live shard reads: an immutable snapshot, and the exact search of its delta.

``index.live.delta.LiveShard`` applies every change under its lock and then publishes a new
``Snapshot``; a search takes the current one (a single reference read) and never sees a
half-applied change nor waits for a refresh. A snapshot holds the base version, which of its row
keys are hidden (as a sorted array for filtered search and as a FAISS selector for the rest),
and views of the first ``n`` delta rows: later appends write past ``n`` or into new arrays, so
what a snapshot sees never changes.

The delta is searched over its live rows, restricted by a filter (``index.query.filters``)
evaluated on the delta's own metadata columns: exactly (``index.ann.exact``) until its first rows
are frozen into blocks, then through the blocks' indexes and exactly over the rows after them
(``index.live.delta_blocks``). ``blocks=False`` asks for the exact scan however many blocks there
are: the recall canary's reference (``LiveShard.search_exact``) must not share the index it checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from index.ann.exact import exact_search
from index.ann.filter_plan import FilterPlan
from index.ann.shard_index import ShardIndex
from index.live.delta_blocks import DeltaBlock, search_frozen
from index.query.facets import column_facets, merge_facets
from index.query.filters import Filter, evaluate
from index.query.hits import Hit
from index.query.merge import merge_topk
from index.rows.columns import Columns


@dataclass(frozen=True)
class Snapshot:
    base: ShardIndex | None
    exclude: faiss.IDSelector | None  # hidden base row keys (IDSelectorNot of a batch)
    hidden_base_count: int
    hidden: np.ndarray  # the hidden base row keys, sorted (what a filtered search removes)
    vectors: np.ndarray  # (n, dim) float32 view of the delta buffer
    ids: list[str]  # append-only; the first n belong to this snapshot
    uris: list[str]
    alive: np.ndarray  # (n,) bool, a private copy
    alive_count: int
    meta: Columns  # the delta rows' metadata columns (views of the first n rows)
    blocks: tuple[DeltaBlock, ...] = ()  # indexes over the delta rows [0, frozen)
    frozen: int = 0


def exclude_selector(keys: np.ndarray) -> faiss.IDSelector:
    """A FAISS selector of every row key but ``keys`` (sorted int64): hides them in a search."""
    batch = faiss.IDSelectorBatch(keys)
    exclude = faiss.IDSelectorNot(batch)
    exclude.referenced = batch  # keep the inner selector alive with the outer one
    return exclude


def search_base(
    snap: Snapshot,
    q: np.ndarray,
    k: int,
    flt: Filter | None,
    fields: Sequence[str] | None,
    **options,
) -> tuple[list[list[Hit]], FilterPlan | None]:
    """The base version's top ``k`` per query less its hidden row keys (``options``: nprobe,
    candidates, rerank, as ``ShardIndex.search`` takes them), and the plan of its filtered
    search (``ShardIndex.search_filtered``; None without ``flt``)."""
    if snap.base is None:
        return [[] for _ in range(len(q))], None
    if flt is None:
        return snap.base.search(q, k, exclude=snap.exclude, fields=fields, **options), None
    return snap.base.search_filtered(q, k, flt, hidden=snap.hidden, fields=fields, **options)


def search_delta(
    snap: Snapshot,
    q: np.ndarray,
    k: int,
    metric: str,
    shard: int,
    flt: Filter | None = None,
    fields: Sequence[str] | None = None,
    *,
    blocks: bool = True,
) -> list[list[Hit]]:
    """Top ``k`` per query over the snapshot's live delta rows (those ``flt`` allows), through
    its blocks' indexes when it has any and ``blocks``, else exactly; ``fields`` names the
    metadata columns each hit carries."""
    if snap.alive_count == 0:
        return [[] for _ in range(len(q))]
    valid, count = snap.alive, snap.alive_count
    if flt is not None:
        valid = valid & evaluate(flt, snap.meta)
        count = int(np.count_nonzero(valid))
        if count == 0:
            return [[] for _ in range(len(q))]
    if blocks and snap.blocks:
        args = (snap.blocks, snap.frozen, snap.vectors, q, min(k, count), metric, valid)
        scores, rows = search_frozen(*args)
    else:
        scores, rows = exact_search(q, snap.vectors, min(k, count), metric, valid=valid)
    out = []
    for i in range(len(q)):
        found = [(float(s), int(j)) for s, j in zip(scores[i], rows[i], strict=True) if j >= 0]
        metas = snap.meta.records(np.asarray([j for _, j in found], np.int64), fields or [])
        out.append(
            [
                Hit(snap.ids[j], snap.uris[j], s, shard, metas[x] if fields else None)
                for x, (s, j) in enumerate(found)
            ]
        )
    return out


def merged(
    base_hits: list[list[Hit]], delta_hits: list[list[Hit]], k: int, metric: str
) -> list[list[Hit]]:
    """Each query's base and delta hits as one top ``k`` (``index.query.merge``)."""
    pairs = zip(base_hits, delta_hits, strict=True)
    return [merge_topk([b, d], k, metric) for b, d in pairs]


def snapshot_facets(snap: Snapshot) -> dict:
    """What each metadata column holds among the snapshot's visible rows (``index.query.facets``):
    the base's rows less its hidden keys, and the live delta rows."""
    parts = []
    if snap.base is not None:
        visible = np.ones(snap.base.count, bool)
        visible[snap.hidden[snap.hidden < snap.base.count]] = False
        parts.append((snap.base.metadata, visible))
    if snap.alive_count:
        parts.append((snap.meta, snap.alive))
    kinds = {name: kind for columns, _ in parts for name, kind in columns.schema.items()}
    return merge_facets(column_facets(columns, rows, kinds=kinds) for columns, rows in parts)


def snapshot_stats(snap: Snapshot) -> dict:
    """The delta's and the hidden rows' counts (``LiveShard.stats`` adds the rest)."""
    return {
        "delta": snap.alive_count,
        "delta_rows": len(snap.alive),
        "delta_bytes": int(snap.vectors.nbytes),
        "delta_blocks": len(snap.blocks),  # indexed blocks (index.live.delta_blocks)
        "delta_frozen_rows": snap.frozen,  # delta rows in them; the rest are scanned
        "hidden_base_rows": snap.hidden_base_count,
    }


def row_record(
    snap: Snapshot,
    row_id: str,
    where: str,
    index: int,
    delta_ingested: int | None,
    fields: Sequence[str] | None,
    shard: int,
    version: int | None,
) -> dict:
    """``LiveShard.record_of``'s answer for the row at ``index`` of the delta or the base
    (``where``); a delta row's ``ingested_at`` is the shard's (``delta_ingested``)."""
    if where == "delta":
        uri, ingested = snap.uris[index], delta_ingested
        names = list(snap.meta.columns) if fields is None else list(fields)
        metadata = snap.meta.records(np.asarray([index]), names)[0]
    else:
        uri, ingested = snap.base.uri_of(index), snap.base.ingested_at(index)
        metadata = snap.base.metadata_of(np.asarray([index]), fields)[0]
    return {
        "id": row_id,
        "uri": uri,
        "shard": shard,
        "version": version,
        "source": "delta" if where == "delta" else "index",
        "ingested_at_ms": int(ingested),
        "metadata": metadata,
    }
