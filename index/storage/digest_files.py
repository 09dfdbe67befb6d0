"""Small store files named by their content's digest: written once, checked when read.

A store-wide object that every shard and replica must agree on (a routed store's router,
``index.ann.routing``; a store's learned transform, ``index.ann.transform``) is kept as
``<directory>/<stem>-<digest>.npz`` and named in the manifest. The name is the digest of the
bytes, so two writers of the same object create the same file (the second create finds it and
is done) and a reader can tell a torn or edited file from the one the manifest promised.
"""

from __future__ import annotations

import posixpath
from typing import Protocol, TypeVar

from index.storage.store import Store


class DigestNamed(Protocol):
    @property
    def digest(self) -> str: ...

    def to_bytes(self) -> bytes: ...


T = TypeVar("T", bound=DigestNamed)


def save_by_digest(store: Store, directory: str, stem: str, obj: DigestNamed) -> str:
    """Create ``<directory>/<stem>-<digest>.npz`` once; the path (relative to the root)."""
    path = posixpath.join(directory, f"{stem}-{obj.digest}.npz")
    try:
        store.create_bytes(store.path(path), obj.to_bytes())
    except FileExistsError:
        pass  # the same bytes: the name is their digest
    return path


def read_by_digest(store: Store, path: str, stem: str, parse: type[T], error: type[Exception]) -> T:
    """``parse.from_bytes`` of the file at ``path``; ``error`` when its bytes are not the ones
    its name promises."""
    obj = parse.from_bytes(store.read_bytes(store.path(path)))
    if posixpath.basename(path) != f"{stem}-{obj.digest}.npz":
        raise error(f"{path} does not hold the {stem} its name promises (torn or edited)")
    return obj
