"""Approximate nearest neighbours for one shard: index choice (written rules), building from
arrays, tuning nprobe, loading and searching a version (IVF+PQ or Flat, filtered or not), exact
search and full-precision rerank.

Imports ``index.storage``, ``index.query`` and ``index.rows``.
"""
