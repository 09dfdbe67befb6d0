"""Milvus Lite as users meet it, a peer of the peers benchmark: the ``milvus-lite`` gRPC server
on a free loopback port and ``pymilvus``, one collection per index type over the benchmark's
vectors (HNSW, M=16, efConstruction=200; IVF_SQ8 with ~sqrt(N) lists), inserted in batches of
``BATCH`` rows, its defaults otherwise. Collections are kept in the server's data folder and
reused when complete.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness.lance_table import partitions
from pipelines.local_ray import free_port

BATCH = 10_000


class MilvusLite:
    """``milvus-lite server`` with its data under ``data_dir``; ``client`` talks to it."""

    def __init__(self, data_dir: Path):
        from pymilvus import MilvusClient

        self.port = free_port()
        exe = Path(sys.executable).with_name("milvus-lite")
        self.proc = subprocess.Popen(
            [str(exe), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1"]
            + ["--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                self.client = MilvusClient(uri=f"http://127.0.0.1:{self.port}")
                self.client.list_collections()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.5)  # pacing the start-up poll

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def build(client, base: np.ndarray, n: int) -> dict:
    """One collection per index type over ``base[:n]``, inserted and indexed."""
    from pymilvus import DataType, MilvusClient

    dim, info = base.shape[1], {}
    for itype, params in (
        ("HNSW", {"M": 16, "efConstruction": 200}),
        ("IVF_SQ8", {"nlist": partitions(n)}),
    ):
        name = f"vs_{itype.lower()}_{n}_{dim}"
        if client.has_collection(name):
            stats = client.get_collection_stats(name)
            if int(stats.get("row_count", 0)) == n:
                client.load_collection(name)
                info[itype] = {"collection": name, "reused": True, "params": params}
                continue
            client.drop_collection(name)
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type=itype, metric_type="IP", params=params)
        client.create_collection(name, schema=schema, index_params=index)
        t = time.perf_counter()
        for start in range(0, n, BATCH):
            rows = range(start, min(n, start + BATCH))
            client.insert(name, [{"row": r, "vector": base[r]} for r in rows])
        insert_s = time.perf_counter() - t
        t = time.perf_counter()
        client.flush(name)
        client.load_collection(name)
        info[itype] = {
            "collection": name,
            "params": params,
            "insert_seconds": round(insert_s, 1),
            "flush_load_seconds": round(time.perf_counter() - t, 1),
        }
        print(f"Milvus Lite {itype} {params}: {info[itype]}", flush=True)
    return {"rows": n, "by_index": info}


def searcher(client, collection: str, knob: str, ids: list[str], k: int):
    """``search(q, knob value, _) -> ids`` on one collection (one query at a time)."""

    def search(q, value, _unused):
        params = {"metric_type": "IP", "params": {knob: value}}
        found = client.search(
            collection, data=[q.tolist()], limit=k, output_fields=["row"], search_params=params
        )
        return [ids[int(hit.id)] for hit in found[0]]

    return search
