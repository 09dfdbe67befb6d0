"""Table files of inputs and metadata (``.csv``, ``.parquet``, ``.jsonl``/``.ndjson``), read in
batches with their ``uri`` column resolved to input URIs the way list files are.

Shared by input listing (``pipelines.inputs``: a table file names inputs) and the sidecar join
(``pipelines.sidecar``: its other columns are the rows' metadata).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import pyarrow as pa

from index.rows import schema
from pipelines.uris import InputError, entry_uri, filesystem_of

CSV_BLOCK_BYTES = 64 * 2**20
BATCH_ROWS = 65_536


def read_table_batches(spec: str) -> Iterator[pa.Table]:
    """The rows of a sidecar table, in batches, ``uri`` resolved to input URIs; rows without a
    ``uri`` are kept with a null one (the caller counts and drops them)."""
    fs, path = filesystem_of(spec)
    base = posixpath.dirname(path)
    suffix = posixpath.splitext(path)[1].lower()
    try:
        with fs.open(path, "rb") as f:
            for batch in _batches(f, suffix):
                table = pa.Table.from_batches([batch])
                if schema.URI not in table.column_names:
                    raise InputError(
                        f"{spec}: a metadata table needs a 'uri' column; it has "
                        f"{', '.join(table.column_names) or 'none'}"
                    )
                uris = table[schema.URI].cast(pa.string()).to_pylist()
                resolved = [
                    entry_uri(fs, spec, base, u.strip()) if u and u.strip() else None for u in uris
                ]
                i = table.column_names.index(schema.URI)
                yield table.set_column(i, schema.URI, pa.array(resolved, pa.string()))
    except FileNotFoundError:
        raise InputError(f"{spec}: no such metadata table") from None
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise InputError(f"{spec}: cannot read it as a table: {e}") from None


def _batches(f, suffix: str) -> Iterator[pa.RecordBatch]:
    if suffix == ".csv":
        import pyarrow.csv as csv

        reader = csv.open_csv(f, read_options=csv.ReadOptions(block_size=CSV_BLOCK_BYTES))
        yield from reader
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)
    elif suffix in (".jsonl", ".ndjson"):
        import pyarrow.json as pj

        yield from pj.read_json(f).to_batches(BATCH_ROWS)
    else:
        raise InputError(f"metadata tables are .csv, .parquet or .jsonl files, not {suffix!r}")


def iter_table_uris(spec: str) -> Iterator[str]:
    """The input URIs a table file of inputs names (its ``uri`` column, blanks skipped)."""
    for table in read_table_batches(spec):
        yield from (u for u in table[schema.URI].to_pylist() if u)
