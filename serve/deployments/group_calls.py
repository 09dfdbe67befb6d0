"""How the ingress calls a shard group: the planner's ``ShardGroup`` over a deployment handle.

A query's searches are on every query's path, so they take the cheaper transport; the other
calls (vectors for answer shaping; writes and reads by id go through the ingress's own handles)
stay Ray actor tasks, whose payloads have no message cap (``ServeConfig.handle_transport``).
"""

from __future__ import annotations

import functools

import grpc
from ray.serve.handle import DeploymentHandle

from serve.planner import ShardGroup


def group_of_handle(handle, shards: list[int], transport: str) -> ShardGroup:
    """The planner's view of a group deployment's handle (or of a ``LocalGroup``): a search
    over gRPC with the "grpc" ``transport`` (``search_over_grpc``), everything else as an actor
    task (``ServeConfig.handle_transport``)."""
    search = handle.search.remote
    if transport == "grpc" and isinstance(handle, DeploymentHandle):
        search = functools.partial(search_over_grpc, handle.options(_by_reference=False), handle)
    return ShardGroup(
        shards, search=search, vectors_of=lambda pairs: handle.vectors_of.remote(pairs)
    )


async def search_over_grpc(quick, slow, *args):
    """A group's search sent straight to the replica's gRPC server (``quick``); an answer over
    gRPC's message cap (``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``, 4 MiB: 1,000 hits with
    kilobytes of metadata each) is asked again as an actor task (``slow``), whose answers have
    no such cap. Other failures are the shard's, as over either transport."""
    try:
        return await quick.search.remote(*args)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return await slow.search.remote(*args)
