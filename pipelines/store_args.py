"""The store's command-line options, the same for every job: ``--store URI`` and repeatable
``--storage-option KEY=VALUE`` (fsspec options: endpoint, keys, region), parsed by
``index.storage.store.parse_storage_options``.
"""

from __future__ import annotations

import argparse


def add_store_args(
    parser: argparse.ArgumentParser, required: bool = False, store_help: str = "store root URI"
) -> None:
    parser.add_argument("--store", required=required, help=store_help)
    parser.add_argument(
        "--storage-option",
        action="append",
        dest="storage_options",
        metavar="KEY=VALUE",
        help="fsspec option of the store (repeatable), e.g. endpoint_url=http://127.0.0.1:9000",
    )
