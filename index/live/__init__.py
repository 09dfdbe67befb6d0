"""A shard while it changes: the live view (base version + delta parts + tombstones), the one
rebuild path that folds them into a new version, and recall of what is live against exact.

The top floor of ``index``.
"""
