"""A hash shard's share of the top k (``index.query.share``): the fewest results a shard can be
asked for while the merge still finds the global top k but with probability MISS per shard."""

from __future__ import annotations

import math

import numpy as np

from index.query.share import MISS, share_k


def exceeded(k: int, shards: int, m: int) -> float:
    """P(Binomial(k, 1/shards) > m), summed from the top (no cancellation)."""
    p = 1 / shards
    return sum(math.comb(k, j) * p**j * (1 - p) ** (k - j) for j in range(m + 1, k + 1))


def test_share_k_is_the_fewest_that_is_exceeded_rarely_and_still_covers_k():
    for shards in (1, 2, 3, 4, 8, 16, 64, 256):
        for k in (1, 2, 5, 10, 20, 50, 100, 1000):
            m = share_k(k, shards)
            assert 1 <= m <= k
            if shards == 1:
                assert m == k
                continue
            assert m * shards >= k and exceeded(k, shards, m) <= MISS * 1.0001
            if m > 1:  # one fewer breaks a rule
                assert (m - 1) * shards < k or exceeded(k, shards, m - 1) > MISS


def test_a_random_hash_placement_puts_more_than_the_share_in_a_shard_about_as_often_as_said():
    rng = np.random.default_rng(0)
    k, shards, trials = 10, 16, 200_000
    m = share_k(k, shards)  # 5
    counts = np.zeros((trials, shards), np.int64)
    np.add.at(counts, (np.repeat(np.arange(trials), k), rng.integers(0, shards, trials * k)), 1)
    rate = (counts > m).mean()  # per (query, shard)
    assert rate <= 3 * MISS and abs(rate - exceeded(k, shards, m)) < 3e-5
