"""The work inside the embedding job's Ray Data stages; plain functions and one class, no driver.

    URIs ──read_decode_batch (CPU tasks)──> uint8 crops + error rows
         ──EmbedWriter (actor pool, GPU or CPU)──> Parquet parts per shard + errors parts

Failure of one input never fails a batch: every exception while reading, decoding or embedding
one image becomes an error row (uri, id, stage, error) that ends in ``<store>/errors/``.

Parts are named by a hash of the ids they hold, so a retried task or a re-run of the same batch
overwrites its own file instead of adding a copy, and each write is atomic (``Store``), so a
killed job leaves only whole parts. Together with the driver skipping ids already stored, that
makes kill + re-run end with every input exactly once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedding import Embedder, ImageError, ModelConfig, decode_image, prepare
from index import schema
from index.sharding import content_id, shards_of
from index.store import Store
from pipelines.inputs import read_uri

log = logging.getLogger(__name__)

CROP = "crop"  # fixed_size_list<uint8>[S*S*3]: 4x smaller than float32 on the wire
READ, DECODE, EMBED = "read", "decode", "embed"


def part_key(values: list[str]) -> str:
    """Deterministic part name key: the same set of ids always gives the same file name."""
    joined = "\n".join(sorted(values)).encode("utf-8")
    return hashlib.blake2b(joined, digest_size=12).hexdigest()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# ---- stage 1: read + decode + crop (CPU tasks) -------------------------------------------------
def read_decode_batch(
    batch: pa.Table,
    *,
    image_size: int,
    resize_size: int,
    max_pixels: int,
    max_bytes: int,
) -> pa.Table:
    """(id, uri) rows -> (id, uri, crop, width, height, stage, error) rows, one per input."""
    uris = batch[schema.URI].to_pylist()
    ids = batch[schema.ID].to_pylist()
    n = len(uris)
    crops = np.zeros((n, image_size, image_size, 3), np.uint8)
    ok = np.zeros(n, bool)
    widths: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n
    stages: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    for i, uri in enumerate(uris):
        try:
            data = read_uri(uri, max_bytes)
        except Exception as e:  # missing, permission, network: this input only
            stages[i], errors[i] = READ, _describe(e)
            continue
        try:
            img = decode_image(data, max_pixels, max_bytes, draft_size=resize_size)
            crops[i] = prepare(img, image_size, resize_size)
        except ImageError as e:
            stages[i], errors[i] = DECODE, str(e)
            continue
        except Exception as e:  # a codec bug or odd mode: still one input's problem
            stages[i], errors[i] = DECODE, f"unsupported: {_describe(e)}"
            continue
        widths[i], heights[i] = img.info.get("source_size", img.size)
        ok[i] = True
    flat = pa.array(crops.reshape(-1), pa.uint8())
    crop_col = pa.FixedSizeListArray.from_arrays(
        flat, image_size * image_size * 3, mask=pa.array(~ok)
    )
    return pa.table(
        {
            schema.ID: pa.array(ids, pa.string()),
            schema.URI: pa.array(uris, pa.string()),
            CROP: crop_col,
            schema.WIDTH: pa.array(widths, pa.int32()),
            schema.HEIGHT: pa.array(heights, pa.int32()),
            schema.STAGE: pa.array(stages, pa.string()),
            schema.ERROR: pa.array(errors, pa.string()),
        }
    )


# ---- dedup pre-pass: content ids ---------------------------------------------------------------
def hash_batch(batch: pa.Table, *, max_bytes: int) -> pa.Table:
    """(uri) rows -> (uri, id = content hash or null, error): the ids of ``--dedup`` runs."""
    uris = batch[schema.URI].to_pylist()
    ids: list[str | None] = []
    errors: list[str | None] = []
    for uri in uris:
        try:
            ids.append(content_id(read_uri(uri, max_bytes)))
            errors.append(None)
        except Exception as e:
            ids.append(None)
            errors.append(_describe(e))
    return pa.table(
        {
            schema.URI: pa.array(uris, pa.string()),
            schema.ID: pa.array(ids, pa.string()),
            schema.ERROR: pa.array(errors, pa.string()),
        }
    )


# ---- stage 2: embed + write (actor pool) -------------------------------------------------------
class EmbedWriter:
    """One model per actor; embeds a batch of crops and writes its rows, shard by shard.

    Writing here (not in a further stage) keeps the float vectors out of the object store; one
    Parquet part per (batch, shard) costs a few ms against a model call of a second on CPU.
    """

    def __init__(
        self,
        model: dict[str, Any],
        store_uri: str,
        num_shards: int,
        actors: int = 1,
    ):
        model = dict(model)
        if model.get("threads") is None and model.get("device", "cpu") == "cpu":
            # the pool shares this machine: split its cores between the actors on it
            model["threads"] = max(1, len(os.sched_getaffinity(0)) // max(1, actors))
        self.embedder = Embedder(ModelConfig(**model))
        self.store = Store(store_uri)
        self.num_shards = num_shards

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        failed = pc.is_valid(batch[schema.STAGE])
        good = batch.filter(pc.invert(failed))
        bad = batch.filter(failed)
        err_uris = bad[schema.URI].to_pylist()
        err_ids = bad[schema.ID].to_pylist()
        err_stages = bad[schema.STAGE].to_pylist()
        err_msgs = bad[schema.ERROR].to_pylist()

        ids = good[schema.ID].to_pylist()
        uris = good[schema.URI].to_pylist()
        widths = good[schema.WIDTH].to_pylist()
        heights = good[schema.HEIGHT].to_pylist()
        vectors, failures = self._embed(good)
        for i, reason in sorted(failures.items()):
            err_uris.append(uris[i])
            err_ids.append(ids[i])
            err_stages.append(EMBED)
            err_msgs.append(reason)
        kept = [i for i in range(len(ids)) if i not in failures]
        written = 0
        if kept:
            ids = [ids[i] for i in kept]
            uris = [uris[i] for i in kept]
            widths = [widths[i] for i in kept]
            heights = [heights[i] for i in kept]
            vectors = vectors[kept]
            written = self._write_embeddings(ids, uris, vectors, widths, heights)
        if err_uris:
            table = schema.errors_table(err_uris, err_msgs, err_stages, err_ids)
            key = part_key([f"{u}\t{i}" for u, i in zip(err_uris, err_ids, strict=True)])
            path = posixpath.join(self.store.errors_dir, self.store.new_part_name(key))
            self.store.write_parquet(table, path)
        return pa.table(
            {
                "embedded": pa.array([len(kept)], pa.int64()),
                "errors": pa.array([len(err_uris)], pa.int64()),
                "parts": pa.array([written], pa.int64()),
                "seconds": pa.array([time.perf_counter() - started], pa.float64()),
                "error_stages": pa.array([",".join(err_stages)], pa.string()),
            }
        )

    def _embed(self, good: pa.Table) -> tuple[np.ndarray, dict[int, str]]:
        """Vectors of the decoded rows, and {row: reason} for rows the model failed on."""
        n = good.num_rows
        size = self.embedder.image_size
        if n == 0:
            return np.zeros((0, self.embedder.dim), np.float32), {}
        flat = good[CROP].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        crops = flat.reshape(n, size, size, 3)
        try:
            return self.embedder.embed(crops), {}
        except Exception as batch_error:  # find the culprit instead of losing the batch
            log.warning("batch of %d failed to embed (%s); retrying one by one", n, batch_error)
        vectors = np.zeros((n, self.embedder.dim), np.float32)
        failures: dict[int, str] = {}
        for i in range(n):
            try:
                vectors[i] = self.embedder.embed(crops[i : i + 1])[0]
            except Exception as e:
                failures[i] = _describe(e)
        return vectors, failures

    def _write_embeddings(self, ids, uris, vectors, widths, heights) -> int:
        shards = shards_of(ids, self.num_shards)
        now = schema.now_ms()
        parts = 0
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            shard_ids = [ids[i] for i in rows]
            table = schema.embeddings_table(
                shard_ids,
                [uris[i] for i in rows],
                vectors[rows],
                [widths[i] for i in rows],
                [heights[i] for i in rows],
                ingested_at=now,
            )
            name = self.store.new_part_name(part_key(shard_ids))
            directory = self.store.embeddings_dir(int(shard))
            self.store.write_parquet(table, posixpath.join(directory, name))
            parts += 1
        return parts
