"""The routed layout: rows placed in shards by where their vectors lie, so a query visits a few.

In the hash layout (``index.rows.sharding``) a row's shard is a hash of its id: shards are
balanced and every query must visit every shard, so the CPU a query costs grows with the cluster.
In the *routed* layout a coarse quantizer trained once per store (``Router``: ``cells`` k-means
centroids, each cell owned by one shard) places each row in the shard of its vector's nearest
cell, and a query visits only the ``shards_probe`` shards owning its nearest cells, as an IVF
index visits ``nprobe`` lists, one level up.

- **Cells, then shards.** There are several cells per shard (``CELLS_PER_SHARD``), grouped into
  shards by ``assign_cells``: cells are handed out largest first, each to the shard whose cells
  lie nearest that still has room (``BALANCE``: at most 10 % over an even share of the sample),
  so a shard holds neighbouring cells (a query's nearest cells share few shards) and shards stay
  near even in size. A rebalance (``assign_cells`` again on today's counts) moves whole cells
  between shards: it is a relayout of the rows (``pipelines.route_store``), not a query-time
  change.
- **The default probe is measured, not guessed.** ``train_router`` holds out part of its sample
  as queries and records ``default_probe``: the fewest shards whose cells hold at least
  ``TARGET_COVERAGE`` of those queries' exact top-10 neighbours among the sample (the written
  rule, ``default_probe_for``). A request may ask for more or fewer (``shards_probe``).
- **Region rows follow their image** (``index.rows.regions``): the writer routes an image's
  region rows to the shard of its whole-image vector, so an image's rows stay in one shard as
  in the hash layout.

Ids no longer name a row's shard, so writes by id (``serve.writes``) take their stamp from the
id's hash shard (the clock of that id, as before) and reach every shard with tombstones; lookups
by id ask every shard. A plain module: no Ray, no store; ``to_bytes``/``from_bytes`` are what the
store keeps (``_routing/router-<digest>.npz``, named in the manifest).
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass

import faiss
import numpy as np

from index.ann.exact import exact_search
from index.rows.regions import parent_of
from index.storage.digest_files import read_by_digest, save_by_digest
from index.storage.manifest import Manifest
from index.storage.store import Store

CELLS_PER_SHARD = 8
BALANCE = 1.10  # a shard's cells hold at most this many times an even share of the sample
TARGET_COVERAGE = 0.97  # default_probe: this share of held-out queries' top-10 in the probed shards
HOLDOUT = 500  # sample rows kept out of training to measure the default probe
TOP = 10


class RoutingError(ValueError):
    """A router that cannot be trained or read as asked."""


@dataclass(frozen=True)
class Router:
    """A store's coarse quantizer: ``centroids`` (cells x dim) and the shard of each cell."""

    centroids: np.ndarray  # float32 (cells, dim)
    cell_shard: np.ndarray  # int32 (cells,): the shard owning each cell
    metric: str  # "ip" or "l2", the store's
    num_shards: int
    default_probe: int  # shards a query visits unless it asks (``default_probe_for``)
    coverage: tuple[float, ...] = ()  # measured top-10 coverage at probe 1, 2, ... (training)

    def __post_init__(self) -> None:
        if self.metric not in ("ip", "l2"):
            raise RoutingError(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if len(self.cell_shard) != len(self.centroids):
            raise RoutingError("one shard per cell")
        if len(self.cell_shard) and (
            self.cell_shard.min() < 0 or self.cell_shard.max() >= self.num_shards
        ):
            raise RoutingError(f"cell shards must lie in [0, {self.num_shards})")
        if not 1 <= self.default_probe <= self.num_shards:
            raise RoutingError(f"default_probe must be in [1, {self.num_shards}]")

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def cells_of(self, vectors: np.ndarray, n: int = 1) -> np.ndarray:
        """The ``n`` nearest cells of each vector, nearest first (int64 (len, n))."""
        x = np.asarray(vectors, np.float32).reshape(-1, self.dim)
        return exact_search(x, self.centroids, min(n, len(self.centroids)), self.metric)[1]

    def shards_of(self, vectors: np.ndarray) -> np.ndarray:
        """The shard each vector is stored in: its nearest cell's (int32)."""
        return self.cell_shard[self.cells_of(vectors, 1)[:, 0]].astype(np.int32)

    def probe(self, vector: np.ndarray, shards_probe: int | None = None) -> list[int]:
        """The shards one query visits: those owning its nearest cells, nearest first, until
        ``shards_probe`` (default ``default_probe``) distinct shards."""
        want = self.default_probe if shards_probe is None else int(shards_probe)
        if not 1 <= want <= self.num_shards:
            raise RoutingError(f"shards_probe must be in [1, {self.num_shards}], got {want}")
        # on every query's path: each shard's best cell (one product, one max per shard), then
        # the shards by it (ties to the lower shard); |q|^2 is the same for every cell in l2
        q = np.asarray(vector, np.float32).reshape(self.dim)
        dots = self.centroids @ q
        score = dots if self.metric == "ip" else 2 * dots - self._squared_norms
        order, starts, owners = self._cells_by_shard
        best = np.maximum.reduceat(score[order], starts)
        return owners[np.argsort(-best, kind="stable")[:want]].tolist()

    @functools.cached_property
    def _squared_norms(self) -> np.ndarray:
        return np.square(self.centroids).sum(axis=1)

    @functools.cached_property
    def _cells_by_shard(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cells ordered by shard, where each shard's run starts, and the shards that own
        a cell (a shard without one is never visited)."""
        order = np.argsort(self.cell_shard, kind="stable")
        owners, starts = np.unique(self.cell_shard[order], return_index=True)
        return order, starts, owners

    @property
    def digest(self) -> str:
        """16 hex digits of BLAKE2b over the router's bytes: its name in the store."""
        return hashlib.blake2b(self.to_bytes(), digest_size=8).hexdigest()

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            centroids=self.centroids.astype(np.float32),
            cell_shard=self.cell_shard.astype(np.int32),
            meta=np.array([self.num_shards, self.default_probe], np.int64),
            metric=np.array(self.metric),
            coverage=np.array(self.coverage, np.float64),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Router:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                num_shards, default_probe = (int(v) for v in f["meta"])
                return cls(
                    np.ascontiguousarray(f["centroids"], np.float32),
                    f["cell_shard"].astype(np.int32),
                    str(f["metric"]),
                    num_shards,
                    default_probe,
                    tuple(float(c) for c in f["coverage"]),
                )
        except (OSError, KeyError, ValueError) as e:
            raise RoutingError(f"not a router file: {e}") from None


def _first_distinct(shards: np.ndarray, want: int) -> list[int]:
    out: list[int] = []
    for s in shards.tolist():
        if s not in out:
            out.append(s)
            if len(out) == want:
                break
    return out


def assign_cells(
    centroids: np.ndarray, counts: np.ndarray, num_shards: int, metric: str
) -> np.ndarray:
    """The shard of each cell: balanced (a shard's count at most ``BALANCE`` x an even share,
    where the cells allow) and local (a cell goes to the shard whose cells lie nearest).

    Shard seeds are a weighted k-means of the cell centroids into ``num_shards``; cells are then
    handed out largest first to the nearest seed with room, the least loaded when none has."""
    cells = len(centroids)
    if cells < num_shards:
        raise RoutingError(f"{cells} cells cannot fill {num_shards} shards")
    counts = np.asarray(counts, np.float64)
    cap = BALANCE * max(counts.sum(), 1.0) / num_shards
    seeds = (
        centroids
        if cells == num_shards
        else _weighted_kmeans(centroids, counts, num_shards, metric)
    )
    order = exact_search(centroids, seeds, num_shards, metric)[1]
    load = np.zeros(num_shards)
    owner = np.full(cells, -1, np.int32)
    for cell in np.argsort(-counts, kind="stable"):
        room = [s for s in order[cell] if load[s] + counts[cell] <= cap]
        shard = room[0] if room else int(np.argmin(load))
        owner[cell] = shard
        load[shard] += counts[cell]
    for shard in np.flatnonzero(np.bincount(owner, minlength=num_shards) == 0):
        donor = int(np.argmax(np.bincount(owner, minlength=num_shards)))  # no shard left empty
        owner[np.flatnonzero(owner == donor)[-1]] = shard
    return owner


def _weighted_kmeans(x: np.ndarray, weights: np.ndarray, k: int, metric: str) -> np.ndarray:
    """``k`` centres of the rows ``x`` weighted by ``weights`` (a few hundred cells: numpy's
    Lloyd iterations, seeded by the heaviest rows spread apart, deterministic)."""
    w = np.maximum(np.asarray(weights, np.float64), 1e-9)
    centres = [int(np.argmax(w))]
    gap = np.full(len(x), np.inf)
    for _ in range(1, k):  # farthest-first, weighted: heavy cells far from the chosen ones
        gap = np.minimum(gap, np.square(x - x[centres[-1]]).sum(axis=1))
        centres.append(int(np.argmax(gap * w)))
    c = x[centres].astype(np.float64)
    for _ in range(20):
        nearest = exact_search(x, c.astype(np.float32), 1, metric)[1][:, 0]
        for j in range(k):
            mine = nearest == j
            if mine.any():
                c[j] = np.average(x[mine], axis=0, weights=w[mine])
        if metric == "ip":
            c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(c, np.float32)


def default_probe_for(coverage: list[float]) -> int:
    """The written rule: the fewest shards whose measured coverage reaches ``TARGET_COVERAGE``
    (all of them when none does)."""
    for probe, share in enumerate(coverage, start=1):
        if share >= TARGET_COVERAGE:
            return probe
    return len(coverage)


def probe_coverage(router: Router, queries: np.ndarray, base: np.ndarray) -> list[float]:
    """Share of each query's exact top-10 in ``base`` that lies in the shards it would visit,
    for every probe 1..num_shards (what routing alone loses, before any ANN index)."""
    truth = exact_search(queries, base, min(TOP, len(base)), router.metric)[1]
    base_shard = router.shards_of(base)
    visit = router.cells_of(queries, len(router.centroids))
    hits = np.zeros(router.num_shards)
    for q in range(len(queries)):
        ranked = _first_distinct(router.cell_shard[visit[q]], router.num_shards)
        rank = {s: i for i, s in enumerate(ranked)}
        for shard in base_shard[truth[q]]:
            hits[rank.get(int(shard), router.num_shards - 1) :] += 1
    return [float(h) / truth.size for h in hits]


def train_router(
    sample: np.ndarray,
    num_shards: int,
    metric: str = "ip",
    cells_per_shard: int = CELLS_PER_SHARD,
    seed: int = 0,
) -> Router:
    """A router for ``num_shards`` shards trained on ``sample`` (rows of the store's vectors,
    ideally a uniform sample of tens of thousands): k-means cells, cells grouped into shards
    (``assign_cells``), and ``default_probe`` measured on ``HOLDOUT`` held-out rows."""
    x = np.ascontiguousarray(np.asarray(sample, np.float32))
    if x.ndim != 2 or not len(x):
        raise RoutingError("the sample must be a non-empty (rows, dim) array")
    holdout = min(HOLDOUT, len(x) // 5)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    queries, train = x[order[:holdout]], x[order[holdout:]]
    cells = num_shards * max(1, int(cells_per_shard))
    if len(train) < cells * 4:
        raise RoutingError(
            f"{len(train)} training rows for {cells} cells: need at least {cells * 4} "
            "(a larger sample, or fewer cells per shard)"
        )
    km = faiss.Kmeans(x.shape[1], cells, niter=20, seed=seed + 1, spherical=metric == "ip")
    km.train(train)
    centroids = np.ascontiguousarray(km.centroids, np.float32)
    probe_all = Router(centroids, np.zeros(cells, np.int32), metric, 1, 1)
    counts = np.bincount(probe_all.cells_of(train, 1)[:, 0], minlength=cells)
    owner = assign_cells(centroids, counts, num_shards, metric)
    router = Router(centroids, owner, metric, num_shards, num_shards)
    if not holdout:
        return router
    coverage = probe_coverage(router, queries, train)
    return Router(
        centroids, owner, metric, num_shards, default_probe_for(coverage), tuple(coverage)
    )


def route_region_rows(ids: list[str], shards: np.ndarray) -> np.ndarray:
    """``shards`` with each region row moved to its image row's shard when the image row is
    among ``ids`` (``index.rows.regions``: an image's rows live in one shard)."""
    where = {row_id: i for i, row_id in enumerate(ids) if parent_of(row_id) == row_id}
    out = np.asarray(shards, np.int32).copy()
    for i, row_id in enumerate(ids):
        parent = parent_of(row_id)
        if parent != row_id and parent in where:
            out[i] = out[where[parent]]
    return out


ROUTING_DIR = "_routing"


def save_router(store: Store, router: Router) -> str:
    """Write ``router`` to the store (``_routing/router-<digest>.npz``, created once: the name
    is its content's digest) and return the path the manifest records."""
    return save_by_digest(store, ROUTING_DIR, "router", router)


@functools.lru_cache(maxsize=16)
def _read_router(store: Store, path: str) -> Router:
    return read_by_digest(store, path, "router", Router, RoutingError)


def load_router(store: Store, manifest: Manifest) -> Router | None:
    """The router of a routed store (read once per store and file), None for a hashed one."""
    if manifest.layout != "routed":
        return None
    router = _read_router(store, manifest.router)
    if router.num_shards != manifest.num_shards or router.dim != manifest.dim:
        raise RoutingError(
            f"router {manifest.router} is for {router.num_shards} shards of {router.dim}-d, "
            f"the store has {manifest.num_shards} of {manifest.dim}-d"
        )
    return router
