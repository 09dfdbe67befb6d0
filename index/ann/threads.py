"""FAISS's OpenMP threads, set for the thread that searches.

OpenMP keeps its thread count per calling thread: ``faiss.omp_set_num_threads`` in a replica's
``__init__`` does not reach the threads that search later (the query batcher's, a shard pool's),
which start with OpenMP's default, every core of the machine. Several replicas on one box then
each run every search on all the cores, and OpenMP's idle workers spin between calls: measured
on this 2-core box (8 shards of 25k rows in one replica, c=1), the searcher spent 7.7 ms of CPU
per query with the default against 7.1 with one thread, and p50 fell from 10.7 to 9.6 ms.
``use_threads`` is cheap enough to call at the start of every search.
"""

from __future__ import annotations

import threading

_local = threading.local()


def use_threads(threads: int) -> None:
    """FAISS (OpenMP) runs this thread's searches on ``threads`` threads from now on."""
    if getattr(_local, "threads", None) == threads:
        return
    import faiss

    faiss.omp_set_num_threads(int(threads))
    _local.threads = threads
