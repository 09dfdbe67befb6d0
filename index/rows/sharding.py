"""The one place that decides row ids and which shard a row lives in.

Ids must be stable across re-runs and machines (so a re-run can skip work and a query by id finds
the same row), which rules out Python's salted ``hash()``. We use BLAKE2b: fast, in the standard
library, and well mixed in its low bits, so ``digest mod num_shards`` balances shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from index.rows.regions import parent_of

ID_HEX_CHARS = 16  # 64-bit ids: collisions become likely only around 4 billion rows per catalogue


def uri_id(uri: str) -> str:
    """Id of an image named by its source URI (the default: re-running on a bucket is a no-op)."""
    return hashlib.blake2b(uri.encode("utf-8"), digest_size=ID_HEX_CHARS // 2).hexdigest()


def content_id(data: bytes) -> str:
    """Id of an image by its bytes (dedup mode: the same picture under two URIs is one row)."""
    return hashlib.blake2b(data, digest_size=ID_HEX_CHARS // 2).hexdigest()


def shard_of(row_id: str, num_shards: int) -> int:
    """Shard of one id: the first 8 bytes of BLAKE2b(id), little-endian, modulo ``num_shards``.

    A region row (``index.rows.regions``) lives in its image's shard: the image's delete, its
    tombstones and the collapse of its regions to one hit all stay within one shard."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    digest = hashlib.blake2b(parent_of(row_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


def shards_of(row_ids: Iterable[str], num_shards: int) -> np.ndarray:
    """``shard_of`` for many ids at once, as an int32 array."""
    return np.fromiter((shard_of(i, num_shards) for i in row_ids), dtype=np.int32)


def shard_dir_name(shard: int) -> str:
    """Hive-style folder name of a shard (``shard=00003``), so Parquet readers see the column."""
    return f"shard={shard:05d}"
