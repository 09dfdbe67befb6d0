"""The query planner: one checked query in, one merged and shaped answer out, over the shard groups.

The catalogue is split into shards, and the shards into *groups* (``serve.app``); each group
answers a search for all of its shards at once (``serve.deployments.searcher``). For one query
the planner:

1. **Scatters** it to every group (in a routed store, ``index.ann.routing``: to the groups
   holding the ``shards_probe`` shards nearest the query, and each of them searches only
   those) and **gathers** the answers before one shared deadline
   (``serve.scatter.gather_with_deadline``). A group that misses the deadline or fails is left
   out: the answer is *partial* and names that group's shards in ``missing`` (with the reason,
   cut to its kind for an anonymous caller). When no group has answered by then, the planner
   waits on for the first one up to ``first_answer_s`` (``needed_shard_deadline_ms``); when
   none answers by then either, the query fails (503 ``no_shard_answered``).
2. **Merges** the groups' top lists (``index.query.merge.merge_topk``, the same merge the groups
   and the in-process search use) into the best ``k``; more when shaping needs a pool to choose
   from (``ShapeOptions.fetch_k``).
3. **Shapes** the answer (``index.query.shaping``): query expansion scatters a second time with
   the expanded query (same filter, same parameters); dedup and diversification fetch the
   vectors of the pool from the groups that hold them; when dedup collapses the pool into fewer
   than ``k`` groups of near-duplicates, the pool grows (x4, up to ``MAX_K``, or an anonymous
   caller's ``max_shape_pool``: ``SearchParams.max_pool``) and is shaped again. The shaping
   arithmetic (dedup is O(pool²) in Python) runs in a worker thread, never on the event loop.

A plain class: its groups are plain async callables (``ShardGroup``), so it runs and is tested
without Ray or Serve (``tests/test_planner.py``); the ingress deployment hands it callables that
call the group deployments' handles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from index.ann.routing import Router
from index.query.hits import Hit
from index.query.merge import merge_topk
from index.query.shaping import POOL_FACTOR, Shaped, expanded_query, self_ids_of
from index.query.shaping import shape as shape_hits
from serve.config import MAX_K
from serve.http.errors import ApiError, redact
from serve.http.validate import SearchParams
from serve.scatter import gather_with_deadline

# search(vector, k, nprobe, candidates, rerank, filter, fields, shards) -> the group's merged top
# list over ``shards`` (None: all the group's):
# {"ids", "uris", "scores", "shards"} (+ "metadata": one object per hit, + "regions": the
# matched region's box per hit in a store with regions) (``ShardSearcher.search``)
SearchCall = Callable[..., Awaitable[dict]]
# vectors_of([(shard, id), ...]) -> the rows' vectors in order, None where a row is gone
VectorsCall = Callable[[list[tuple[int, str]]], Awaitable[list]]


@dataclass(frozen=True)
class ShardGroup:
    """A group of shards as the planner sees it: which shards it holds and its two calls."""

    shards: Sequence[int]
    search: SearchCall
    vectors_of: VectorsCall


@dataclass
class Answer:
    """What the planner found for one query."""

    hits: list[Hit]  # best first; at most k once shaped
    missing: list[dict]  # {"shard", "reason"} of every shard some scatter of the query missed
    pool: list[Hit]  # the first scatter's merged hits, before any shaping (the canary's sample)
    pool_missing: list[dict]  # the shards the first scatter missed
    collapsed: list[tuple[str, ...]] | None = field(default=None)  # with dedup, per hit
    visited: int = 0  # shards the first scatter was sent to (all but in a routed store)

    def results(self, k: int) -> list[dict]:
        """The answer's ``results`` (``serve.http.models.Result``): plain JSON values only."""
        rows = [
            {
                "id": h.id,
                "uri": h.uri,
                "score": float(h.score),
                "shard": h.shard,
                "metadata": h.metadata or {},
            }
            for h in self.hits[:k]
        ]
        for row, h in zip(rows, self.hits, strict=False):
            if h.region is not None:  # found by one of its region rows (index.rows.regions)
                row["region"] = list(h.region)
        if self.collapsed is not None:
            for row, ids in zip(rows, self.collapsed, strict=True):
                row["collapsed"] = list(ids)
        return rows


class QueryPlanner:
    def __init__(
        self,
        groups: Sequence[ShardGroup],
        metric: str,
        deadline_s: float,
        router: Router | None = None,
        first_answer_s: float | None = None,
    ):
        self.groups = list(groups)
        self.metric = metric
        self.deadline_s = deadline_s
        # when no group answered within deadline_s, wait for the first one until this long
        self.first_answer_s = first_answer_s
        self.num_shards = sum(len(group.shards) for group in self.groups)
        self.group_of = {s: g for g, group in enumerate(self.groups) for s in group.shards}
        self.router = router  # a routed store's (index.ann.routing); None: visit every shard

    def visit(self, vector: np.ndarray, shards_probe: int | None) -> dict[int, tuple[int, ...]]:
        """group -> the shards of it one query visits: every shard of a hashed store; in a
        routed store the ``shards_probe`` (default: the router's) nearest the query.
        422 when ``shards_probe`` is more than the store's shards, or given to a hashed store."""
        if shards_probe is not None and shards_probe > self.num_shards:
            raise ApiError(
                422,
                "shards_probe_out_of_range",
                f"shards_probe must be in 1..{self.num_shards}, got {shards_probe}",
            )
        if self.router is None:
            if shards_probe is not None and shards_probe < self.num_shards:
                raise ApiError(
                    422,
                    "shards_probe_unsupported",
                    "this store is hash-sharded: every query visits all "
                    f"{self.num_shards} shards (shards_probe needs a routed store)",
                )
            return {g: tuple(group.shards) for g, group in enumerate(self.groups)}
        out: dict[int, list[int]] = {}
        for shard in sorted(self.router.probe(vector, shards_probe)):
            out.setdefault(self.group_of[shard], []).append(shard)
        return {g: tuple(shards) for g, shards in out.items()}

    async def search(
        self,
        vector: np.ndarray,
        params: SearchParams,
        fields: tuple[str, ...],
        *,
        keyed: bool = True,
        query_id: str | None = None,
    ) -> Answer:
        """The answer to one query ``vector`` with ``params`` (its ``filter`` goes to every
        group; each shard evaluates it on its own columns), the results carrying the metadata
        ``fields``. ``keyed``: the caller has the API key (else failure reasons are redacted);
        ``query_id``: the catalogue row the query is (an id query; for ``exclude_self``)."""
        shape = params.shape
        # = k unless shaping needs more to choose from, and never past the caller's pool cap
        fetch = max(params.k, shape.fetch_k(params.k, min(MAX_K, params.max_pool)))
        visit = self.visit(vector, params.shards_probe)  # once: scatter and count
        pool, missing = await self.gather(vector, fetch, params, fields, keyed, visit)
        visited = sum(len(shards) for shards in visit.values())
        answer = Answer(pool, list(missing), pool, missing, visited=visited)
        if shape.active:
            hits, shaped, again = await self._shape(
                vector, pool, fetch, params, fields, keyed, query_id
            )
            answer.hits = hits
            answer.missing += [m for m in again if m not in answer.missing]
            if shape.dedup is not None:
                answer.collapsed = [item.collapsed for item in shaped]
        return answer

    async def gather(
        self,
        vector: np.ndarray,
        k: int,
        params: SearchParams,
        fields: tuple[str, ...],
        keyed: bool = True,
        visit: dict[int, tuple[int, ...]] | None = None,
    ) -> tuple[list[Hit], list[dict]]:
        """Scatter one query to the groups it visits (``visit``, worked out here when not
        given), gather before the deadline, merge the top ``k``; returns the hits and the
        shards that did not answer (503 when none did)."""
        visit = self.visit(vector, params.shards_probe) if visit is None else visit
        every = self.router is None  # a group searches all its shards unless told which
        gathered = await gather_with_deadline(
            {
                g: (
                    lambda group=self.groups[g], only=None if every else shards: group.search(
                        vector,
                        k,
                        params.nprobe,
                        params.candidates,
                        params.rerank,
                        params.filter,
                        fields,
                        only,
                    )
                )
                for g, shards in visit.items()
            },
            self.deadline_s,
            self.first_answer_s,
        )
        missing = self.missing_shards(gathered.missing, keyed, visit)
        if not gathered.answers:
            asked = sum(len(shards) for shards in visit.values())
            raise ApiError(
                503,
                "no_shard_answered",
                f"none of {asked} shards answered within "
                f"{max(self.deadline_s, self.first_answer_s or 0) * 1000:.0f} ms",
                {"missing_shards": missing},
            )
        per_group = [
            [
                Hit(i, u, score, shard, metadata, None if region is None else tuple(region))
                for i, u, score, shard, metadata, region in zip(
                    answer["ids"],
                    answer["uris"],
                    answer["scores"],
                    answer["shards"],
                    answer.get("metadata") or [None] * len(answer["ids"]),
                    answer.get("regions") or [None] * len(answer["ids"]),
                    strict=True,
                )
            ]
            for _, answer in sorted(gathered.answers.items())
        ]
        return merge_topk(per_group, k, self.metric), missing

    def missing_shards(
        self,
        missing: dict[int, str],
        keyed: bool = True,
        visit: dict[int, tuple[int, ...]] | None = None,
    ) -> list[dict]:
        """Per-shard entries for the groups that did not answer, naming the shards they were
        asked to search (``visit``; default all of theirs); reasons redacted when anonymous."""
        rows = [
            {"shard": s, "reason": reason}
            for g, reason in sorted(missing.items())
            for s in (visit[g] if visit is not None else self.groups[g].shards)
        ]
        return rows if keyed else redact(rows)

    async def _shape(
        self,
        vector: np.ndarray,
        hits: list[Hit],
        fetch: int,
        params: SearchParams,
        fields: tuple[str, ...],
        keyed: bool,
        query_id: str | None,
    ) -> tuple[list[Hit], list[Shaped], list[dict]]:
        """Query expansion (a second scatter with the expanded query), then
        ``index.query.shaping``, growing dedup's pool while it collapses below ``k``. Returns
        the shaped hits, their ``Shaped`` records (for ``collapsed``) and the shards the extra
        scatters missed."""
        shape = params.shape
        limit = max(fetch, min(MAX_K, params.max_pool))  # the pool's cap for this caller
        missing: list[dict] = []
        self_ids = None
        if shape.exclude_self:  # before expansion moves the query off its own vector
            self_ids = {query_id} if query_id is not None else self_ids_of(hits, self.metric)
        if shape.expand and hits:
            top = hits[: shape.expand_m]
            found = await self.vectors_of(top)
            # (an ingress started before its store's first build learned a transform sends the
            # model's vectors, while rows come back reduced: no expansion then, index.ann.transform)
            kept = [h for h in top if h.id in found and len(found[h.id]) == len(vector)]
            if kept:
                expanded = expanded_query(
                    vector,
                    np.stack([found[h.id] for h in kept]),
                    [h.score for h in kept],
                    shape.expand_alpha,
                    self.metric,
                )
                hits, missing = await self.gather(expanded, fetch, params, fields, keyed)
                vector = expanded
        known: dict[str, np.ndarray] = {}
        while True:
            if shape.needs_vectors:
                known |= await self.vectors_of([h for h in hits if h.id not in known])
            # dedup compares every pair of the pool in Python: off the event loop, so other
            # requests of this replica are not held up behind it
            shaped = await asyncio.to_thread(
                shape_hits, hits, params.k, shape, self.metric, vectors=known, self_ids=self_ids
            )
            if shape.dedup is None or len(shaped) >= params.k or len(hits) < fetch:
                break
            if fetch >= limit:
                break  # as many as this caller may have: fewer than k groups exist in reach
            # the pool collapsed below k near-duplicate groups: search again with a larger one
            fetch = min(limit, fetch * POOL_FACTOR)
            hits, more = await self.gather(vector, fetch, params, fields, keyed)
            missing += [m for m in more if m not in missing]
        return [item.hit for item in shaped], shaped, missing

    async def vectors_of(self, hits: list[Hit]) -> dict[str, np.ndarray]:
        """id -> vector of ``hits``, one call per group holding any (rows gone are left out)."""
        by_group: dict[int, list[tuple[int, str]]] = {}
        for h in hits:
            by_group.setdefault(self.group_of[h.shard], []).append((h.shard, h.id))
        gathered = await gather_with_deadline(
            {g: (lambda g=g: self.groups[g].vectors_of(by_group[g])) for g in by_group},
            self.deadline_s,
        )
        out: dict[str, np.ndarray] = {}
        for g, vectors in gathered.answers.items():
            for (_, row_id), vector in zip(by_group[g], vectors, strict=True):
                if vector is not None:
                    out[row_id] = np.asarray(vector, np.float32)
        return out
