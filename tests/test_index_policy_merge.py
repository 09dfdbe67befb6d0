"""The index rules (policy.py) and the top-k merge (merge.py): pure functions, no FAISS build."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from index.ann.policy import (
    FASTSCAN_MIN_LIST,
    HNSW_QUANTIZER_MIN_NLIST,
    ID_BYTES,
    MIN_NLIST,
    NPROBE_MIN,
    IndexSpec,
    choose_index,
    visit_nprobe,
)
from index.query.hits import Hit
from index.query.merge import merge_topk
from index.units import parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4G", 4 * 2**30),
        ("512M", 512 * 2**20),
        ("16GB", 16 * 2**30),
        ("1.5g", int(1.5 * 2**30)),
        ("2GiB", 2 * 2**30),
        ("100k", 100 * 2**10),
        ("123", 123),
        (1024, 1024),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "G", "4X", "-1G", "four", True, -5])
def test_parse_bytes_refuses_garbage(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_tiny_shards_get_an_exact_flat_index():
    spec = choose_index(100, 1280, "ip")
    assert spec.kind == "flat" and spec.factory == "Flat" and spec.nlist == 0
    assert any("Flat" in r for r in spec.reasons)
    assert choose_index(30 * MIN_NLIST - 1, 64).kind == "flat"
    assert choose_index(0, 64).kind == "flat"
    assert choose_index(30 * MIN_NLIST, 64).kind == "ivfpq"


@pytest.mark.parametrize("n", [480, 2_000, 8_177, 125_000, 1_000_000, 20_000_000])
@pytest.mark.parametrize("dim", [128, 256, 1280])
def test_ivfpq_rules_hold(n, dim):
    spec = choose_index(n, dim, "l2", "4G")
    assert spec.kind == "ivfpq"
    # nlist: a power of two in [4 sqrt(n), 8 sqrt(n)) unless capped by the training rule (>= 30
    # rows per list) or fast-scan padding (>= 128 codes per list on average)
    assert spec.nlist & (spec.nlist - 1) == 0 and spec.nlist >= MIN_NLIST
    assert spec.train_size >= 30 * spec.nlist and spec.train_size <= n
    band = 1 << math.ceil(math.log2(4 * math.sqrt(n)))
    caps = [1 << int(math.log2(n / 30)), 1 << int(math.log2(n / FASTSCAN_MIN_LIST))]
    assert spec.nlist == max(MIN_NLIST, min([band, *caps]))
    if n >= 1_000_000:
        assert 4 * math.sqrt(n) <= spec.nlist < 8 * math.sqrt(n)
    # PQ: m divides dim, the code fits the factory string, the shard fits the budget
    assert dim % spec.pq_m == 0
    coarse = f"IVF{spec.nlist}" + ("_HNSW32" if spec.nlist >= HNSW_QUANTIZER_MIN_NLIST else "")
    assert spec.factory == f"{coarse},PQ{spec.pq_m}x{spec.nbits}fsr"
    assert n * (spec.code_bytes + ID_BYTES) + spec.nlist * dim * 4 <= parse_bytes("4G")
    assert 1 <= spec.nprobe <= spec.nlist
    assert IndexSpec.from_dict(spec.to_dict()) == spec


def test_budget_shrinks_the_code_and_refuses_the_impossible():
    roomy = choose_index(10_000_000, 256, "ip", "16G")
    tight = choose_index(10_000_000, 256, "ip", "300M")
    assert tight.code_bytes < roomy.code_bytes
    assert 10_000_000 * (tight.code_bytes + ID_BYTES) <= parse_bytes("300M")
    assert any("halving" in r for r in tight.reasons)
    with pytest.raises(ValueError, match="more shards"):
        choose_index(100_000_000, 256, "ip", "500M")
    with pytest.raises(ValueError):
        choose_index(100, 8, "cosine")


def test_the_benchmark_shape_stays_under_80_bytes_per_vector():
    spec = choose_index(1_000_000, 256, "ip", "4G")
    assert spec.code_bytes + ID_BYTES <= 80


def test_a_query_visiting_many_hash_shards_shares_the_nprobe_floor_among_them():
    one = choose_index(1_000_000, 256)  # one index of the whole: IVF4096, floor 8 lists
    part = choose_index(62_500, 256)  # one of 16 hash shards of it: IVF256
    assert (one.nlist, part.nlist) == (4096, 256)
    # the shard's 1 list of 256 is the share of the catalogue 8 lists of 4096 are, over 16
    assert visit_nprobe(NPROBE_MIN, 1, part.nlist, 62_500, 16) == 1
    assert visit_nprobe(NPROBE_MIN, 1, part.nlist, 62_500, 4) == 2  # the whole: 250k, IVF2048
    assert visit_nprobe(NPROBE_MIN, 3, part.nlist, 62_500, 16) == 3  # never below the measured
    assert visit_nprobe(NPROBE_MIN, 1, part.nlist, 62_500, 2) == 4  # the whole: IVF512
    assert visit_nprobe(2, 1, part.nlist, 62_500, 2) == 2  # never above the tuned default
    assert visit_nprobe(NPROBE_MIN, 1, part.nlist, 62_500, 1) == NPROBE_MIN  # alone: the floor
    assert visit_nprobe(NPROBE_MIN, None, part.nlist, 62_500, 16) == NPROBE_MIN  # untuned
    assert visit_nprobe(1, 1, 0, 500, 16) == 1  # a Flat version has no lists


# ---- merge ------------------------------------------------------------------------------------
def _brute(per_shard, k, metric):
    union = {}
    for hits in per_shard:
        for h in hits:
            old = union.get(h.id)
            if old is None or (h.score > old.score if metric == "ip" else h.score < old.score):
                union[h.id] = h
    sign = -1 if metric == "ip" else 1
    return sorted(union.values(), key=lambda h: (sign * h.score, h.id))[:k]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_merge_matches_brute_force_over_the_union(metric):
    rng = random.Random(7)
    for trial in range(200):
        shards = rng.randint(1, 6)
        per_shard = []
        for s in range(shards):
            size = rng.randint(0, 12)  # some shards give fewer than k, some nothing
            # few distinct scores: many ties, across and within shards
            hits = [Hit(f"s{s}-{i}", f"u{s}-{i}", float(rng.randint(0, 5)), s) for i in range(size)]
            best_first = sorted(hits, key=lambda h: -h.score if metric == "ip" else h.score)
            per_shard.append(best_first)
        k = rng.randint(1, 15)
        got = merge_topk(per_shard, k, metric)
        assert got == _brute(per_shard, k, metric), trial
        # the order the shards answered in does not matter
        for perm in itertools.islice(itertools.permutations(per_shard), 5):
            assert merge_topk(list(perm), k, metric) == got


def test_merge_direction_dedup_and_edge_cases():
    a = [Hit("x", "ux", 0.9), Hit("y", "uy", 0.5)]
    b = [Hit("z", "uz", 0.7), Hit("x", "ux", 0.8), Hit("n", "un", float("nan"))]
    assert [h.id for h in merge_topk([a, b], 3, "ip")] == ["x", "z", "y"]
    assert merge_topk([a, b], 3, "ip")[0].score == 0.9  # duplicate id: best score kept
    assert [h.id for h in merge_topk([a, b], 2, "l2")] == ["y", "z"]
    assert merge_topk([], 5, "ip") == [] and merge_topk([[], []], 5, "l2") == []
    assert merge_topk([a], 0, "ip") == []
    assert len(merge_topk([a, b], 100, "ip")) == 3
    with pytest.raises(ValueError):
        merge_topk([a], 3, "cosine")
