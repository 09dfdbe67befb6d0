"""Which FAISS index a shard gets: written-down rules from its size, dimension and a memory budget.

The rules (autofaiss-style; every decision is also recorded in ``IndexSpec.reasons`` and so in
the version's ``meta.json``):

=====================  ==========================================================================
decision               rule
=====================  ==========================================================================
flat or IVF+PQ         IVF needs >= 30 training vectors per list and at least ``MIN_NLIST``
                       lists, so a shard with ``n < 30 * MIN_NLIST`` rows gets an exact ``Flat``
                       index (also when the code would not be smaller than the float vectors).
nlist                  the smallest power of two >= ``4 * sqrt(n)`` (DESIGN's 4..16 sqrt(n)),
                       capped to the largest power of two <= ``n / 30`` (training rule), to
                       <= ``n / FASTSCAN_MIN_LIST`` (fast-scan stores lists in blocks of 32
                       codes: lists averaging >= 128 codes keep the padding <= ~12%; measured
                       76 B/vector with ~244 codes per list (index_build.json) against 83 with
                       ~98 (pq_choice.json), both 64 B codes + 8 B ids at 256-d) and to
                       ``MAX_NLIST``. The fast-scan cap binds below ~262k rows per shard.
coarse quantizer       an exact scan of the centroids below ``HNSW_QUANTIZER_MIN_NLIST`` (4096)
                       lists; from there an HNSW graph over them (``IVF{nlist}_HNSW32``) for
                       the searches, since a query scans every centroid of every shard it
                       visits before any code: one warm query 0.067 / 0.31 / 2.9 ms against
                       0.034 / 0.067 / 0.15 through the graph at 4096 / 16384 / 65536 lists of
                       256-d, and a replica's many shards are not warm (10M x 256 in 16 shards
                       of IVF4096, group search in process, 1 thread: the 16 scans were 2.2 of
                       5.6 ms a query). The build trains and fills the lists by the exact scan
                       and builds the graph after (``index.ann.build.exact_lists``,
                       efConstruction 80): filled through the graph the rows of that store lost
                       0.007 recall@10 that no search could win back. Lists in exact order
                       (filtered search, ``index.ann.ivf_lists``) come from the centroids too.
training sample        ``min(n, max(TRAIN_PER_LIST * nlist, 39 * 2**nbits))`` rows drawn at
                       random (>= 30 per list; FAISS k-means wants 39 per centroid).
code size              target ``dim / CODE_DIM_RATIO`` bytes per vector (64 B at 256-d); halved
                       until ``n * (code + 8 id bytes) + fixed`` fits the memory budget, where
                       fixed is centroids + PQ tables. Refused when even ``MIN_CODE_BYTES``
                       does not fit (use more shards).
PQ bits                4-bit fast-scan with residuals (``PQ{m}x4fsr``, m = 2 * code bytes).
                       Measured (benchmarks/pq_choice.json, 200k x 256-d, equal code size,
                       100 rerank candidates): recall@10 after rerank 0.949 vs 0.959 for 8-bit
                       ``PQ{m/2}`` at 64 B (0.823 vs 0.836 at 32 B) - a gap the tuned rerank
                       candidates below close; search without rerank faster (0.04 vs 0.16
                       ms/query at nprobe 64, noisy shared box); build 5x faster (13 s vs 71 s:
                       8-bit PQ training dominates, and takes minutes on 1280-d). Residual
                       encoding (``fsr``) is worth +0.07 recall over plain ``fs``.
PQ m                   must divide dim: the largest divisor of dim <= the target m.
OPQ / PCA              not chosen: an OPQ rotation gained +0.003 recall at 8x the build time
                       on 256-d and took > 5 minutes to train on 1280-d; PCA is not used
                       because rerank needs the full vectors anyway (the factory accepts both
                       when a caller passes its own IndexSpec).
RaBitQ, SQ, rerank     measured, not chosen yet (benchmarks/bytes_per_vector.json, 300k x 256-d,
vectors                recall@10 >= 0.95 after float16 rerank): IVF-RaBitQ 1-bit with 8-bit
                       queries 48 B/vector, recall 0.983 in 0.21 ms/query vs 79 B and 0.31 ms
                       for ``PQ128x4fsr``; ``PQ64x4fsr`` 44 B but 0.65 ms (400 candidates);
                       SQ4/SQ8 136/264 B. A RaBitQ rule made an add at 1280-d take > 1 s to
                       show in tests/test_freshness_http.py, not yet explained, so PQ stays.
                       SQ8 and PCA-to-dim/2 rerank vectors reached only 0.91 / 0.28 on the
                       mixture (0.985 / 0.964 on the CNN embeddings): float16 stays.
default nprobe         ``clamp(nlist / NPROBE_DIVISOR, NPROBE_MIN, nlist)`` as the starting
                       point; the build then measures the index (``index.ann.tune``): recall@10
                       after rerank over nprobe <= 4x that and 50..6400 candidates, on sample
                       rows with exact ground truth, and records the cheapest defaults reaching
                       recall 0.98 (fewest candidates first, then the smallest nprobe, but at
                       least 8 lists). A query that visits V hash shards at once shares that
                       floor among them (``visit_nprobe``: each probes the share of the
                       catalogue 8 lists of one index of the V shards' rows would be).
=====================  ==========================================================================

The memory budget covers what a loaded shard holds in RAM: codes, ids, centroids and tables.
The float16 rerank vectors are memory-mapped from disk and are not counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from index.units import parse_bytes

METRICS = ("ip", "l2")
MIN_NLIST = 16
MAX_NLIST = 65536
MIN_TRAIN_PER_LIST = 30
TRAIN_PER_LIST = 64
CODE_DIM_RATIO = 4  # bytes of code per vector = dim / 4 (16x smaller than float32)
MIN_CODE_BYTES = 4
ID_BYTES = 8
NBITS = 4
FASTSCAN_MIN_LIST = 128
FASTSCAN_BLOCK = 32
NPROBE_DIVISOR = 16
HNSW_QUANTIZER_MIN_NLIST = 4096  # from here the coarse quantizer is an HNSW graph (rules above)
HNSW_QUANTIZER_M = 32  # links per centroid (its level-0 graph holds twice as many)
# the graph's build-time search depth: 80 against FAISS's 40 kept recall@10 0.9816 against 0.9751
# at 400 candidates (10M x 256, IVF4096 shards, efSearch 16; the exact scan 0.9825)
HNSW_QUANTIZER_EF_CONSTRUCTION = 80
NPROBE_MIN = 8
FLOAT_BYTES = 4


@dataclass
class IndexSpec:
    """The rules' decision for one shard; serialised into the version's ``meta.json``."""

    kind: str  # "flat" or "ivfpq"
    factory: str  # FAISS factory string, e.g. "OPQ32,IVF1024,PQ32x4fs" or "Flat"
    nlist: int
    pq_m: int
    nbits: int
    train_size: int
    nprobe: int  # default nprobe for search
    reasons: list[str] = field(default_factory=list)
    opq: bool = False
    candidates: int = 0  # default rerank candidates for k=10; 0: max(4k, 100) (set by tuning)

    @property
    def code_bytes(self) -> float:
        """Bytes of PQ code per vector (float32 vector for flat)."""
        return self.pq_m * self.nbits / 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, body: dict) -> IndexSpec:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in body.items() if k in names})


def choose_index(
    n: int, dim: int, metric: str = "ip", memory_budget: str | int = "4G"
) -> IndexSpec:
    """Apply the module's rules to a shard of ``n`` vectors of ``dim`` dimensions."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if n < 0 or dim < 1:
        raise ValueError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    budget = parse_bytes(memory_budget)
    flat_bytes = n * dim * FLOAT_BYTES
    reasons: list[str] = []

    if n < MIN_TRAIN_PER_LIST * MIN_NLIST:
        reasons.append(
            f"n={n} < {MIN_TRAIN_PER_LIST}*{MIN_NLIST}: too few rows to train an IVF with "
            f">= {MIN_NLIST} lists and >= {MIN_TRAIN_PER_LIST} vectors per list -> exact Flat"
        )
        _check_budget(flat_bytes, budget, "flat", reasons)
        return IndexSpec("flat", "Flat", 0, 0, 0, n, 0, reasons)

    nlist = _nlist(n, reasons, fast_scan=NBITS == 4)
    target_code = max(MIN_CODE_BYTES, dim // CODE_DIM_RATIO)
    reasons.append(f"code target dim/{CODE_DIM_RATIO} = {target_code} bytes per vector")
    nbits = NBITS
    code = target_code
    while True:
        m = _pq_m(dim, code * 8 // nbits)
        fixed = _fixed_bytes(nlist, dim, m, nbits, opq=False)
        need = n * (m * nbits / 8 + ID_BYTES) + fixed
        if need <= budget or code <= MIN_CODE_BYTES:
            break
        reasons.append(
            f"{code} B codes need {_fmt(need)} > budget {_fmt(budget)}: halving the code size"
        )
        code //= 2
    if need > budget:
        raise ValueError(
            f"a shard of {n} x {dim}-d vectors needs {_fmt(need)} even with {code}-byte codes; "
            f"the budget is {_fmt(budget)}: use more shards or a larger budget"
        )
    if m * nbits / 8 >= dim * FLOAT_BYTES:
        reasons.append("PQ code would not be smaller than the float vectors -> exact Flat")
        _check_budget(flat_bytes, budget, "flat", reasons)
        return IndexSpec("flat", "Flat", 0, 0, 0, n, 0, reasons)

    reasons.append(
        f"4-bit fast-scan PQ{m}x4fsr (residual): {m * nbits // 8} B code + {ID_BYTES} B id per "
        f"vector, dsub={dim / m:g}; RAM ~{_fmt(need)} of budget {_fmt(budget)} (8-bit PQ: "
        "+1% recall after rerank, 3-5x slower build and search; see policy.py)"
    )
    reasons.append("no OPQ/PCA: measured not to pay off (see policy.py)")
    train = min(n, max(TRAIN_PER_LIST * nlist, 39 * 2**nbits))
    reasons.append(
        f"train on {train} rows (>= {MIN_TRAIN_PER_LIST} per list; {TRAIN_PER_LIST} per list "
        f"target, capped at n)"
    )
    nprobe = min(nlist, max(NPROBE_MIN, nlist // NPROBE_DIVISOR))
    reasons.append(f"default nprobe = clamp(nlist/{NPROBE_DIVISOR}, {NPROBE_MIN}, nlist)={nprobe}")
    coarse = f"IVF{nlist}"
    if nlist >= HNSW_QUANTIZER_MIN_NLIST:
        coarse += f"_HNSW{HNSW_QUANTIZER_M}"
        reasons.append(
            f"nlist {nlist} >= {HNSW_QUANTIZER_MIN_NLIST}: the centroids are searched through an "
            f"HNSW{HNSW_QUANTIZER_M} graph, not scanned (see policy.py)"
        )
    factory = f"{coarse},PQ{m}x{nbits}fsr"
    return IndexSpec("ivfpq", factory, nlist, m, nbits, train, nprobe, reasons)


def visit_nprobe(tuned: int, enough: int | None, nlist: int, count: int, visits: int) -> int:
    """A shard's default nprobe when each query visits ``visits`` shards of a hash group at once.

    The tuning's floor (``NPROBE_MIN`` lists above what its sample needs, ``index.ann.tune``) is
    insurance for queries unlike the catalogue: probe at least the share of the catalogue that
    ``NPROBE_MIN`` lists are. A query that visits V shards probes each one, so a shard of
    ``count`` rows in ``nlist`` lists keeps that share of the catalogue probed at
    ``ceil(NPROBE_MIN * nlist / nlist_whole)`` lists, ``nlist_whole`` being the lists one index
    of the V shards' rows would have (``_nlist``). Never below what the shard's sample needs
    (``enough``: the tuning's ``saturated_nprobe``; None, untuned: the ``tuned`` default stands)
    nor above the tuned default.

    16 hash shards of 1M x 256 (IVF256 each; the whole: IVF4096; the sample saturates at 1):
    1 list, not 8; the group's recall@10 0.9934 vs 0.9937, 1.4-2.0 vs 2.0-2.1 ms a query in
    process (B=16). 64 shards of 2M x 256 (IVF128; saturating at 4): 4 lists, recall@10 0.9929
    vs 0.9938 at 8 (0.985 at 1, where a share of the catalogue alone would have put it)."""
    if enough is None or visits <= 1 or nlist <= 0:
        return tuned
    whole = _nlist(max(1, count) * visits, [], fast_scan=NBITS == 4)
    floor = min(nlist, -(-NPROBE_MIN * nlist // whole))
    return max(1, min(tuned, max(enough, floor)))


def estimate_build_memory(n: int, dim: int) -> int:
    """Peak bytes a shard build holds: float32 vectors, their float16 copy, the index being
    filled and the Parquet read buffers (about 2.5 copies of the float32 data) plus a fixed
    interpreter + FAISS overhead. Used as the Ray task's ``memory=`` request."""
    return int(n * dim * FLOAT_BYTES * 2.5 + n * 200 + 300 * 2**20)


def build_memory_request(n: int, dim: int, largest_node: float = 0) -> int:
    """``estimate_build_memory``, capped to the largest node's memory (when known) so the
    request can always be scheduled: asking for more than any node has would wait forever."""
    need = estimate_build_memory(n, dim)
    return int(min(need, largest_node)) if largest_node else need


def _nlist(n: int, reasons: list[str], fast_scan: bool) -> int:
    nlist = 1 << math.ceil(math.log2(4 * math.sqrt(n)))
    reasons.append(f"nlist: smallest power of two >= 4*sqrt(n)={4 * math.sqrt(n):.0f} -> {nlist}")
    cap = _pow2_floor(n / MIN_TRAIN_PER_LIST)
    if nlist > cap:
        reasons.append(f"nlist capped to {cap} so every list has >= {MIN_TRAIN_PER_LIST} rows")
        nlist = cap
    cap = max(MIN_NLIST, _pow2_floor(n / FASTSCAN_MIN_LIST))
    if fast_scan and nlist > cap:
        reasons.append(
            f"nlist capped to {cap}: lists of >= {FASTSCAN_MIN_LIST} codes on average keep "
            f"fast-scan's padding to blocks of {FASTSCAN_BLOCK} small"
        )
        nlist = cap
    if nlist > MAX_NLIST:
        reasons.append(f"nlist capped to {MAX_NLIST}")
        nlist = MAX_NLIST
    return max(MIN_NLIST, nlist)


def _pow2_floor(x: float) -> int:
    return 1 << int(math.floor(math.log2(max(1.0, x))))


def _pq_m(dim: int, target: int) -> int:
    """The largest divisor of dim that is <= target (PQ splits dim into m equal sub-spaces)."""
    target = max(1, min(dim, target))
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _fixed_bytes(nlist: int, dim: int, m: int, nbits: int, opq: bool) -> int:
    centroids = nlist * dim * FLOAT_BYTES
    if nlist >= HNSW_QUANTIZER_MIN_NLIST:  # the graph's links (int32; 2M at level 0)
        centroids += nlist * 2 * HNSW_QUANTIZER_M * 4
    pq_tables = dim * 2**nbits * FLOAT_BYTES
    rotation = dim * dim * FLOAT_BYTES if opq else 0
    return centroids + pq_tables + rotation


def _check_budget(need: int, budget: int, what: str, reasons: list[str]) -> None:
    if need > budget:
        raise ValueError(f"a {what} index needs {_fmt(need)}, over the budget {_fmt(budget)}")
    reasons.append(f"{what} index RAM {_fmt(need)} within budget {_fmt(budget)}")


def _fmt(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"
