"""One spelling per input URI, and the few filesystem primitives every reader of inputs shares.

The URI string is what a row's id is hashed from (``index.rows.sharding.uri_id``), so local
files become absolute paths (``./imgs``, ``/abs/imgs`` and ``file:///abs/imgs`` all give
``/abs/imgs/a.jpg``) and remote ones keep their scheme (``s3://bucket/key``). Listing inputs is
``pipelines.inputs``; reading metadata tables is ``pipelines.tables``; both build on this.
"""

from __future__ import annotations

import os
import posixpath
import re

import fsspec

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_LOCAL_SCHEMES = ("file", "local")


class InputError(ValueError):
    """An input spec that names nothing, or a filesystem whose package is missing."""


def scheme_of(uri: str) -> str | None:
    m = _SCHEME_RE.match(uri)
    return m.group(1).lower() if m else None


def is_local(uri: str) -> bool:
    return scheme_of(uri) in (None, *_LOCAL_SCHEMES)


def canonical_uri(uri: str) -> str:
    """One spelling per file: local -> absolute path without scheme, remote -> unchanged."""
    uri = uri.strip()
    if is_local(uri):
        path = _SCHEME_RE.sub("", uri) if scheme_of(uri) else uri
        return os.path.abspath(os.path.expanduser(path))
    return uri


def _filesystem(spec: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(canonical_uri(spec) if is_local(spec) else spec)
    except (ImportError, ValueError) as e:
        raise InputError(
            f"{spec}: cannot open its filesystem ({e}); install its fsspec package "
            "(s3fs for s3://, gcsfs for gs://, adlfs for az://)"
        ) from None


def entry_uri(fs: fsspec.AbstractFileSystem, spec: str, base: str, entry: str) -> str:
    """The input URI an entry of a list or table file at ``base`` (its folder) names: a remote
    URI as-is; a local path, relative to the file when relative; a relative entry of a remote
    file, next to it on the same store."""
    if scheme_of(entry) and not is_local(entry):
        return entry
    if is_local(spec):
        entry = _SCHEME_RE.sub("", entry) if scheme_of(entry) else entry
        return canonical_uri(entry if os.path.isabs(entry) else os.path.join(base, entry))
    return fs.unstrip_protocol(posixpath.join(base, entry))


def filesystem_of(spec: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of a spec, local paths canonical; InputError names a missing package."""
    return _filesystem(spec)


def read_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of one input, reading at most ``max_bytes + 1`` (a huge file is not loaded).

    Exceptions (missing file, permission, network) propagate: the caller records them per input.
    """
    if is_local(uri):
        with open(canonical_uri(uri), "rb") as f:
            return f.read(max_bytes + 1)
    with fsspec.open(uri, "rb") as f:
        return f.read(max_bytes + 1)
