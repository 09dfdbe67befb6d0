"""What a row is: the Parquet schema, typed metadata columns, which shard holds an id, and which
write of an id is visible (the visibility rule and the clock that stamps writes).

The bottom floor of ``index``: it imports nothing else from the project.
"""
