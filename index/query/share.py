"""How many of the top k one shard of a hash-sharded store must return: its share, not k.

In the hash layout (``index.rows.sharding``) a row's shard is a hash of its id, so the shards
holding a query's true top k are k independent draws over S shards: the count in one shard is
Binomial(k, 1/S). A shard asked for its own top k (and, with rerank, the candidates to find them)
works for results the merge throws away: at 16 shards a query's top 10 has more than 4 in one
shard with probability 1.7e-4. ``share_k`` is the smallest m whose chance of being exceeded in a
shard is at most ``MISS``: asking each shard for m instead of k loses, in expectation, at most
``S * MISS`` results per query (1.6e-4 of recall@10 at 16 shards); with ``m * S >= k`` the merge
still has k to choose from.

A shard's rerank candidates do not shrink with its share: the build tuned them to find its top
10 (``index.ann.tune``), and which rows a shard's compressed index ranks first is as noisy for
its top 5 as for its top 10. Measured (1M x 256 in 16 shards tuned to 100, the default serving
path): 50 candidates for a share of 5 gave recall@10 0.958, 100 gave 0.994. A group searched as
one (``index.live.group_search``) ranks every shard's reranked candidates together, so there the
share only bounds what a shard answers without rerank; a shard searched on its own (filters,
regions) answers its share.

Only for a query that visits every shard of a hash store: in a routed store
(``index.ann.routing``) neighbours gather in the shards a query visits, so a visited shard is
asked for all k.
"""

from __future__ import annotations

import math
from functools import lru_cache

MISS = 1e-4  # the chance, per shard and query, that its share of the top k exceeds share_k


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
