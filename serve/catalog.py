"""What the ingress knows of the store it serves: its manifest, and a metadata schema that grows.

The dimension, metric, shard count and id scheme never change while the app runs; the metadata
schema can (a batch run may add a column). A request that names a column this replica does not
know yet (``unknown_field``, ``invalid_metadata``) makes it re-read the manifest (at most once a
second, ``SCHEMA_RELOAD_S``) and check once more; each new schema is handed to ``on_change`` (the
ingress republishes its OpenAPI document: ``serve.http.openapi``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from index.storage.manifest import Manifest, load_manifest
from index.storage.store import Store
from serve.http.errors import ApiError

SCHEMA_RELOAD_S = 1.0  # at most one manifest read a second for requests naming unknown columns
T = TypeVar("T")


class Catalog:
    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        on_change: Callable[[Manifest], None] | None = None,
    ):
        self.store = store
        self.manifest = manifest
        self.on_change = on_change
        self._read_at = time.monotonic()

    @property
    def metadata(self) -> dict[str, str]:
        """The metadata schema: column -> type."""
        return self.manifest.metadata

    def fields(self, asked: tuple[str, ...] | None) -> tuple[str, ...]:
        """The metadata columns results carry: those ``asked``, else every column."""
        return tuple(self.metadata) if asked is None else asked

    async def checked(self, check: Callable[[Any, dict[str, str]], T], value: Any) -> T:
        """``check(value, schema)`` with the store's metadata schema; when it refuses a column
        this replica has not seen, re-read the manifest (rate-limited) and check once more."""
        try:
            return check(value, self.metadata)
        except ApiError as e:
            if e.error not in ("unknown_field", "invalid_metadata") or not await self._reread():
                raise
        return check(value, self.metadata)

    async def _reread(self) -> bool:
        """Re-read the manifest if the last read is over ``SCHEMA_RELOAD_S`` old; True when the
        metadata schema changed."""
        if time.monotonic() - self._read_at < SCHEMA_RELOAD_S:
            return False
        self._read_at = time.monotonic()
        manifest = await asyncio.to_thread(load_manifest, self.store)
        if manifest is None or manifest.metadata == self.manifest.metadata:
            return False
        self.manifest = manifest
        if self.on_change is not None:
            self.on_change(manifest)
        return True
