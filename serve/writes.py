"""Writes through the HTTP API: a row added or deleted is durable, then searchable, then answered.

``POST /images`` writes the row as a new Parquet part of its shard (``index.live.delta.write_rows``:
atomic, fsynced), with every metadata column of the schema typed as the batch job writes them,
and then hands it to that shard's searcher (``ShardSearcher.add_rows``), so the 201 means durable
*and* searchable (``searchable: false`` when the shard did not answer in time: durable, and every
replica of the shard reads the part on its next store poll, ``delta_poll_s``).
``DELETE /images/{id}`` does the same with a tombstone (``hidden``).

**Order without wall clocks.** Before writing, the writer asks the replica of the id's shard for
the write's stamp (``ShardSearcher.stamp``): later than every write of that id the replica knows,
after it read what other writers added (``index.rows.clock``). So a write acknowledged before
another write of the same id was sent is older than it, whichever ingress replica made each and
whatever their clocks say: a re-add after a delete is visible, a delete after an add hides it
(review 1.5; issue #23). When the shard cannot stamp in time the write is refused with 503
``shard_unavailable`` and nothing is written: a retry is safe, and no write lands with a stamp
that could order it before a write it followed.

**A routed store** (``index.ann.routing``) places a row by its vector, so an id no longer names
its shard. The id's hash shard stays its clock (the stamp comes from there, as above); the row
goes to its vector's shard, and every other shard gets a tombstone of the id at the same stamp
(written before the row), so a copy left in another shard by an earlier write of the id (its
vector moved) is hidden, and the hash shard always sees the write it must order later ones
after. A delete tombstones the id in every shard. The price: one small part per shard per
write, where the hash layout writes one; bulk loads go through the embedding job.

Ids follow the store's id scheme (``Manifest.id_scheme``), the way the embedding job names rows,
so adding a catalogue image again never duplicates it. A plain class: the hand-overs are plain
async callables (the ingress gives it its searcher handles' methods).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import pyarrow as pa

from index.ann.routing import load_router
from index.live.parts import write_rows, write_tombstones
from index.rows import schema
from index.rows.metadata import record_columns
from index.rows.regions import region_ids
from index.rows.sharding import content_id, shard_of, uri_id
from index.storage.store import Store
from serve.catalog import Catalog
from serve.http.errors import ApiError
from serve.http.parse import ParsedAdd
from serve.scatter import call_with_deadline

# add_rows(shard, part, ids, uris, vectors, ingested_ms, metadata) -> {"applied": bool, ...}
AddRowsCall = Callable[..., Awaitable[dict]]
# add_tombstones(shard, part, ids, deleted_ms) -> {"applied": bool, ...}
TombstonesCall = Callable[..., Awaitable[dict]]
# stamp(shard, ids) -> ms: the write's stamp, after every write of ids the shard knows
StampCall = Callable[[int, list[str]], Awaitable[int]]


class RowWriter:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        add_rows: AddRowsCall,
        add_tombstones: TombstonesCall,
        stamp: StampCall,
        deadline_s: float,
    ):
        self.store = store
        self.catalog = catalog
        self.add_rows = add_rows
        self.add_tombstones = add_tombstones
        self.stamp = stamp
        self.deadline_s = deadline_s

    async def _stamp(self, shard: int, row_id: str) -> int:
        """The stamp of a write of ``row_id`` from its shard; 503 when the shard cannot say."""
        ok, answer = await call_with_deadline(self.stamp(shard, [row_id]), self.deadline_s)
        if not ok:
            raise ApiError(
                503,
                "shard_unavailable",
                f"shard {shard} (owner of the id) did not answer ({answer}); nothing was "
                "written, retry",
            )
        return int(answer)

    async def add(self, add: ParsedAdd, vector: np.ndarray) -> dict:
        """Write the checked row ``add`` with its ``vector``; the ``AddResponse`` body."""
        content = add.image if add.kind == "image" else np.asarray(vector, np.float32).tobytes()
        row_id, uri = self.identify(add.row_id, add.uri, content)
        manifest = self.catalog.manifest
        home = shard_of(row_id, manifest.num_shards)  # the id's clock
        router = load_router(self.store, manifest)
        shard = home if router is None else int(router.shards_of(vector)[0])
        ms = await self._stamp(home, row_id)
        if router is not None:  # copies an earlier write left in other shards go first
            others = [s for s in range(manifest.num_shards) if s != shard]
            await self._tombstone(others, [row_id, *region_ids(row_id, manifest.regions)], ms)
        # every column of the schema, typed (null where not given), as the batch job writes them
        columns = record_columns([add.metadata or {}], manifest.metadata)
        extra = {name: columns[name].combine_chunks() for name in columns.column_names}
        vectors = np.asarray(vector, np.float32).reshape(1, -1)
        table = schema.embeddings_table(
            [row_id], [uri], vectors, ingested_at=pa.scalar(ms, schema.TIMESTAMP), extra=extra
        )
        part = await asyncio.to_thread(write_rows, self.store, shard, table)
        if manifest.regions > 1:  # the id's earlier image's regions must not outlive it
            await self._tombstone([shard], region_ids(row_id, manifest.regions), ms)
        metadata = columns.to_pydict() if columns.num_columns else None
        ok, answer = await call_with_deadline(
            self.add_rows(shard, part, [row_id], [uri], vectors, [ms], metadata), self.deadline_s
        )
        return {
            "id": row_id,
            "uri": uri,
            "shard": shard,
            "part": part,
            "ingested_at_ms": ms,
            # false: durable, but the shard did not answer in time; every replica of the shard
            # reads the part on its next store poll (delta_poll_s)
            "searchable": bool(ok and answer.get("applied")),
            "metadata": add.metadata or {},
        }

    async def delete(self, row_id: str) -> dict:
        """Write a tombstone for the checked ``row_id`` (and its region rows' ids, in a store
        with regions: ``index.rows.regions``); the ``DELETE /images/{id}`` body."""
        manifest = self.catalog.manifest
        shard = shard_of(row_id, manifest.num_shards)
        ms = await self._stamp(shard, row_id)
        ids = [row_id, *region_ids(row_id, manifest.regions)]
        routed = manifest.layout == "routed"  # the id may be in any shard: tombstone them all
        part, ms, ok = await self._tombstone(
            list(range(manifest.num_shards)) if routed else [shard], ids, ms
        )
        return {
            "id": row_id,
            "shard": shard,
            "deleted": True,
            "part": part,
            "deleted_at_ms": ms,
            "hidden": ok,
        }

    async def _tombstone(self, shards: list[int], ids: list[str], ms: int) -> tuple[str, int, bool]:
        """Write tombstones for ``ids`` at ``ms`` in each of ``shards`` and hand them to those
        shards: (the first shard's part, the stamp written, whether every shard applied them
        in time)."""

        async def one(shard: int) -> tuple[str, int, bool]:
            part, stamp = await asyncio.to_thread(write_tombstones, self.store, shard, ids, ms)
            ok, answer = await call_with_deadline(
                self.add_tombstones(shard, part, ids, [stamp] * len(ids)), self.deadline_s
            )
            return part, stamp, bool(ok and answer.get("applied"))

        done = await asyncio.gather(*(one(shard) for shard in shards))
        return done[0][0], done[0][1], all(applied for _, _, applied in done)

    def identify(self, row_id: str | None, uri: str | None, content: bytes) -> tuple[str, str]:
        """(id, uri) of a new row by the store's id scheme (``Manifest.id_scheme``):
        ``uri`` scheme: the hash of the URI (an upload without one is ``upload:<content hash>``);
        ``content`` scheme: the hash of the bytes. An explicit ``id`` wins (catalogue keys)."""
        if row_id is not None:  # a catalogue key given by the client
            return row_id, uri or f"upload:{row_id}"
        if self.catalog.manifest.id_scheme == "content":
            row_id = content_id(content)
            return row_id, uri or f"upload:{row_id}"
        uri = uri or f"upload:{content_id(content)}"
        return uri_id(uri), uri
