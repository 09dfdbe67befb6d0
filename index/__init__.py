"""Vectors at rest: store layout, manifest, shard indexes, rerank and merge.

Nothing in this package imports Ray, so it can be tested and benchmarked alone; the Ray jobs in
``pipelines/`` and the Serve graph in ``serve/`` are thin drivers over it.
"""
