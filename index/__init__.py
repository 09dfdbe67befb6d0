"""Vectors at rest, in floors that import only downward (checked by the import contracts in
``pyproject.toml``):

- ``index.live``: a shard while it changes (delta, rebuild, recall);
- ``index.ann``: one shard's ANN index (policy, build, tune, load/search, exact, rerank);
- ``index.storage`` and ``index.query`` (independent of each other): the store protocol, and
  the filter language with the shape of answers;
- ``index.rows``: what a row is.

Nothing in this package imports Ray, so it can be tested and benchmarked alone; the Ray jobs in
``pipelines/`` and the Serve graph in ``serve/`` are thin drivers over it.
"""
