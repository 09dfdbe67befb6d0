"""A shard group searched in the calling replica (``colocate_shards``): no actor hop per query."""

from __future__ import annotations

import asyncio

from serve.deployments.searcher import ShardSearcher, searcher_args


class LocalGroup:
    """A shard group searched inside the calling replica (``colocate_shards``): the same
    ``ShardSearcher`` code, called directly, behind the ``handle.method.remote(...)`` interface
    the ingress uses for a deployment. No actor hop per query: for one box with one ingress
    replica (each ingress replica holds its own copy of the shards)."""

    def __init__(self, config, shards: list[int]):
        self._searcher = ShardSearcher.func_or_class(*searcher_args(config, shards))

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._searcher, name))


class _LocalMethod:
    def __init__(self, method):
        self._method = method

    def remote(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    async def _call(self, *args, **kwargs):
        result = self._method(*args, **kwargs)
        return await result if asyncio.iscoroutine(result) else result
