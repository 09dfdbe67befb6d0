"""The one definition of the embeddings Parquet schema and of the errors Parquet schema.

Embeddings are stored as ``fixed_size_list<float32>[D]`` (not Ray's tensor extension type) so any
Parquet reader, DuckDB or pandas, can read them without Ray installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from index.rows import clock

ID = "id"
URI = "uri"
EMBEDDING = "embedding"
WIDTH = "width"
HEIGHT = "height"
INGESTED_AT = "ingested_at"
ERROR = "error"
STAGE = "stage"
DELETED_AT = "deleted_at"

CORE_COLUMNS = (ID, URI, EMBEDDING, WIDTH, HEIGHT, INGESTED_AT)
TIMESTAMP = pa.timestamp("ms", tz="UTC")


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def embeddings_schema(dim: int, extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """Schema of ``embeddings/shard=NNNNN/part-*.parquet``; user metadata columns go last."""
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(EMBEDDING, embedding_type(dim), nullable=False),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(INGESTED_AT, TIMESTAMP),
    ]
    return pa.schema(fields + list(extra))


ERRORS_SCHEMA = pa.schema(
    [
        pa.field(URI, pa.string(), nullable=False),
        pa.field(ID, pa.string()),
        pa.field(STAGE, pa.string()),  # "read", "decode" or "embed"
        pa.field(ERROR, pa.string()),
        pa.field(INGESTED_AT, TIMESTAMP),
    ]
)


# ``tombstones/shard=NNNNN/part-*.parquet``: a delete of ``id`` at ``deleted_at``. A row is hidden
# when a tombstone for its id is at least as new as the row's ``ingested_at`` (so an id deleted
# and then added again is visible again); see ``index.live.delta``.
TOMBSTONES_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(DELETED_AT, TIMESTAMP, nullable=False),
    ]
)


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, D) float32 -> fixed_size_list<float32>[D] without copying row by row."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<float32>[D] column -> (n, D) float32 numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, dim)


def now_ms() -> pa.Scalar:
    """The write clock (``index.rows.clock``) as an Arrow timestamp."""
    return pa.scalar(clock.now_ms(), type=TIMESTAMP)


def embeddings_table(
    ids: Sequence[str],
    uris: Sequence[str],
    vectors: np.ndarray,
    widths: Sequence[int] | None = None,
    heights: Sequence[int] | None = None,
    ingested_at: pa.Scalar | None = None,
    extra: dict[str, pa.Array] | None = None,
) -> pa.Table:
    """Build a table in the canonical schema (the only constructor writers should use)."""
    n = len(ids)
    if not (len(uris) == n == vectors.shape[0]):
        raise ValueError(f"ids ({n}), uris ({len(uris)}) and vectors ({vectors.shape[0]}) differ")
    ts = ingested_at if ingested_at is not None else now_ms()
    extra = extra or {}
    columns = {
        ID: pa.array(ids, pa.string()),
        URI: pa.array(uris, pa.string()),
        EMBEDDING: vectors_to_arrow(vectors),
        WIDTH: pa.array(widths if widths is not None else [None] * n, pa.int32()),
        HEIGHT: pa.array(heights if heights is not None else [None] * n, pa.int32()),
        INGESTED_AT: pa.array([ts.as_py()] * n, TIMESTAMP),
    }
    schema = embeddings_schema(vectors.shape[1], [pa.field(k, v.type) for k, v in extra.items()])
    return pa.Table.from_pydict({**columns, **extra}, schema=schema)


def errors_table(
    uris: Sequence[str],
    errors: Sequence[str],
    stages: Sequence[str],
    ids: Sequence[str | None] | None = None,
) -> pa.Table:
    n = len(uris)
    ts = now_ms().as_py()
    return pa.Table.from_pydict(
        {
            URI: list(uris),
            ID: list(ids) if ids is not None else [None] * n,
            STAGE: list(stages),
            ERROR: list(errors),
            INGESTED_AT: [ts] * n,
        },
        schema=ERRORS_SCHEMA,
    )


def tombstones_table(ids: Sequence[str], deleted_at: pa.Scalar | None = None) -> pa.Table:
    """Tombstones for ``ids``, all deleted at ``deleted_at`` (default: now)."""
    ts = (deleted_at if deleted_at is not None else now_ms()).as_py()
    return pa.Table.from_pydict(
        {ID: list(ids), DELETED_AT: [ts] * len(ids)}, schema=TOMBSTONES_SCHEMA
    )
