"""How many of the top k one shard of a hash-sharded store must return: its share, not k.

In the hash layout (``index.rows.sharding``) a row's shard is a hash of its id, so the shards
holding a query's true top k are k independent draws over S shards: the count in one shard is
Binomial(k, 1/S). A shard asked for its own top k (and, with rerank, the candidates to find them)
works for results the merge throws away: at 16 shards a query's top 10 has more than 4 in one
shard with probability 1.7e-4. ``share_k`` is the smallest m whose chance of being exceeded in a
shard is at most ``MISS``: asking each shard for m instead of k loses, in expectation, at most
``S * MISS`` results per query (1.6e-4 of recall@10 at 16 shards); with ``m * S >= k`` the merge
still has k to choose from. The rerank candidates shrink with it (``share_candidates``): the
build tuned them to find a shard's top 10 (``index.ann.tune``); its top 5 needs about half,
never fewer than the tuning measured.

Only for a query that visits every shard of a hash store: in a routed store
(``index.ann.routing``) neighbours gather in the shards a query visits, so a visited shard is
asked for all k.
"""

from __future__ import annotations

import math
from functools import lru_cache

MISS = 1e-4  # the chance, per shard and query, that its share of the top k exceeds share_k
# the fewest rerank candidates a share is given: the build's tuning measures recall from 50 up
# (index.ann.tune.CANDIDATE_LADDER); below it, measured on 8 shards of 200k x 256 whose tuned 50
# shrank to 30 for a share of 6, recall@10 fell from 0.994 to 0.990
MIN_CANDIDATES = 50


@lru_cache(maxsize=4096)
def share_k(k: int, shards: int, miss: float = MISS) -> int:
    """The fewest of the top ``k`` one of ``shards`` hash shards is asked for (1 shard: k)."""
    if shards <= 1 or k <= 1:
        return k
    p = 1.0 / shards
    tail = 1.0  # P(X > m), X ~ Binomial(k, p), for m = -1, 0, 1, ...
    for m in range(k):
        tail -= math.comb(k, m) * p**m * (1 - p) ** (k - m)
        if tail <= miss and m * shards >= k:
            return max(m, 1)
    return k


def share_candidates(candidates: int, k: int, share: int) -> int:
    """Rerank candidates for a shard's ``share`` of the top ``k``, from those for all ``k``:
    in proportion, but not below ``MIN_CANDIDATES`` (fewer were never measured)."""
    if share >= k:
        return candidates
    return max(share, min(candidates, MIN_CANDIDATES), -(-candidates * share // k))
