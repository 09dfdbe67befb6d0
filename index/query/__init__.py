"""What a query asks and what it gets back: the metadata filter language, hits, the top-k merge
and answer shaping (expansion, diversity, dedup). Pure functions over arrays; no I/O.

Imports only ``index.rows``.
"""
