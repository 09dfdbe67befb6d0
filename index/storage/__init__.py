"""The store protocol: one root URI (local or fsspec), the manifest and its atomic commits,
immutable version directories, what each version covers, leases, the node cache of remote
files, publishing and garbage collection. No search and no ANN code here.

Imports only ``index.rows``.
"""
