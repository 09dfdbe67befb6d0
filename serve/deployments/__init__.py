"""The Serve deployments: one module per deployment, and what only they need.

``ingress`` (the HTTP routes), ``searcher`` (a group of shards; ``shard_holder``: one shard in
it; ``batching``: queries searched together), ``embedder`` (the query model: the only one that
imports torch), ``rebuilder`` (when to rebuild, and GC) and ``canary`` (live recall). ``serve.app``
composes them. Nothing is imported here: a replica imports only its own deployment's module.
"""
