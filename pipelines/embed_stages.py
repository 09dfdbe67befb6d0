"""The work inside the embedding job's Ray Data stages; plain functions and one class, no driver.

    staged (uri, id) blocks ──read_decode_batch (CPU tasks)──> uint8 crops + error rows
         ──EmbedBatch (actor pool, GPU or CPU)──> vectors + error rows
         ──write_parts (CPU tasks, part_rows at a time)──> a part per shard in the batch
                                                           + an errors part

Failure of one input never fails a batch: every exception while reading, decoding or embedding
one image becomes an error row (uri, id, stage, error) that ends in ``<store>/errors/``.

Parts are named by a hash of the ids they hold, so a retried task or a re-run of the same batch
overwrites its own file instead of adding a copy, and each write is atomic (``Store``), so a
killed job leaves only whole parts. Together with the driver skipping ids already stored, that
makes kill + re-run end with every input exactly once. Rows are stamped with the plan's time,
not the write's (``write_parts``), so a retried write changes nothing and a delete that lands
while the job runs stays in force.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedding import ImageError, decode_image, prepare  # no torch: decode tasks stay light
from embedding.preprocess import CropSpec, crop_box
from index.rows import schema
from index.rows.metadata import metadata_columns
from index.rows.regions import SEPARATOR
from index.rows.regions import boxes as region_boxes
from index.rows.sharding import content_id, shards_of
from index.storage.store import Store
from pipelines.job_metrics import embed_metrics, record
from pipelines.shard_parts import part_key, route_write_batch, stage_orphans, write_shard_parts
from pipelines.uris import read_uri

if TYPE_CHECKING:
    from index.ann.routing import Router

log = logging.getLogger(__name__)

CROP = "crop"  # fixed_size_list<uint8>[S*S*3]: 4x smaller than float32 on the wire
EMBEDDED_AT = "embedded_at"  # wall time the row's model batch finished (not stored)
MODEL_SECONDS = "model_seconds"  # the row's share of its batch's model time (not stored)
READ, DECODE, EMBED = "read", "decode", "embed"


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# ---- stage 1: read + decode + crop (CPU tasks) -------------------------------------------------
def read_decode_batch(
    batch: pa.Table,
    *,
    max_pixels: int,
    max_bytes: int,
    crop: dict | None = None,
    image_size: int | None = None,
    resize_size: int | None = None,
    regions: int = 1,
) -> pa.Table:
    """(id, uri) rows -> (id, uri, crop, width, height, stage, error) rows, one per input, and
    with ``regions`` > 1 one more per region cell of each decoded image (``<id>@rL.i.j``,
    ``index.rows.regions``: the cell cropped from the decoded image, then prepared as a whole
    image is); the batch's metadata columns (from a sidecar) ride along unchanged.

    ``crop``: the model's ``CropSpec`` as a dict (``Embedder.crop``); without it, the
    torchvision centre crop of ``image_size`` after a resize to ``resize_size``."""
    spec = CropSpec.of(crop) if crop is not None else CropSpec(image_size or 224, resize_size)
    # a JPEG draft that keeps the smallest cell's pixels (a whole-image row of a regions store
    # may then differ from a query upload's vector of the same photo in the last digits)
    draft = spec.draft_size if regions == 1 else math.ceil(spec.draft_size * (regions + 1) / 2)
    cells = region_boxes(regions)
    image_size = spec.size
    uris = batch[schema.URI].to_pylist()
    ids = batch[schema.ID].to_pylist()
    source: list[int] = []  # the input row of each output row
    out_ids: list[str | None] = []
    crops: list[np.ndarray | None] = []
    widths: list[int | None] = []
    heights: list[int | None] = []
    stages: list[str | None] = []
    errors: list[str | None] = []

    def emit(i, row_id, pixels=None, size=(None, None), stage=None, error=None) -> None:
        source.append(i)
        out_ids.append(row_id)
        crops.append(pixels)
        widths.append(size[0])
        heights.append(size[1])
        stages.append(stage)
        errors.append(error)

    for i, uri in enumerate(uris):
        try:
            data = read_uri(uri, max_bytes)
        except Exception as e:  # missing, permission, network: this input only
            emit(i, ids[i], stage=READ, error=_describe(e))
            continue
        try:
            img = decode_image(data, max_pixels, max_bytes, draft_size=draft)
            prepared = [(ids[i] + sfx, prepare(crop_box(img, box), spec)) for sfx, box in cells]
        except ImageError as e:
            emit(i, ids[i], stage=DECODE, error=str(e))
            continue
        except Exception as e:  # a codec bug or odd mode: still one input's problem
            emit(i, ids[i], stage=DECODE, error=f"unsupported: {_describe(e)}")
            continue
        size = img.info.get("source_size", img.size)
        for row_id, pixels in prepared:
            emit(i, row_id, pixels, size)
    n = len(out_ids)
    ok = np.array([c is not None for c in crops], bool)
    blank = np.zeros((image_size, image_size, 3), np.uint8)
    stacked = np.stack([blank if c is None else c for c in crops]) if n else blank[:0]
    crop_col = pa.FixedSizeListArray.from_arrays(
        pa.array(stacked.reshape(-1), pa.uint8()), image_size * image_size * 3, mask=pa.array(~ok)
    )
    out = pa.table(
        {
            schema.ID: pa.array(out_ids, pa.string()),
            schema.URI: pa.array([uris[i] for i in source], pa.string()),
            CROP: crop_col,
            schema.WIDTH: pa.array(widths, pa.int32()),
            schema.HEIGHT: pa.array(heights, pa.int32()),
            schema.STAGE: pa.array(stages, pa.string()),
            schema.ERROR: pa.array(errors, pa.string()),
        }
    )
    rows = pa.array(source, pa.int64())
    for name in metadata_columns(batch.column_names):
        out = out.append_column(batch.schema.field(name), batch[name].take(rows))
    return out


# ---- dedup pre-pass: content ids ---------------------------------------------------------------
def hash_batch(batch: pa.Table, *, max_bytes: int, store: Store) -> pa.Table:
    """(uri) rows -> (uri, id = content hash or null, error): the ids of ``--dedup`` runs.
    Inputs that cannot be read are written to the store's ``errors/`` here (stage "read")."""
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
    failed = [i for i, e in enumerate(errors) if e is not None]
    if failed:
        bad_uris = [uris[i] for i in failed]
        table = schema.errors_table(bad_uris, [errors[i] for i in failed], [READ] * len(failed))
        key = part_key([f"{u}\tNone" for u in bad_uris])
        store.write_parquet(table, posixpath.join(store.errors_dir, store.new_part_name(key)))
    return pa.table(
        {
            schema.URI: pa.array(uris, pa.string()),
            schema.ID: pa.array(ids, pa.string()),
            schema.ERROR: pa.array(errors, pa.string()),
        }
    )


# ---- stage 2: embed (actor pool) ---------------------------------------------------------------
class EmbedBatch:
    """One model per actor: crops in, vectors out; rows that already failed pass through.

    Keeps the GPU (or the CPU cores) busy with nothing but the model: decoding happened in CPU
    tasks before, writing happens in tasks after.
    """

    def __init__(self, model: dict[str, Any], actors: int = 1):
        from embedding.model import Embedder, ModelConfig  # torch: only in the actors

        model = dict(model)
        if model.get("threads") is None and model.get("device", "cpu") == "cpu":
            # the pool shares this machine: split its cores between the actors on it
            model["threads"] = max(1, len(os.sched_getaffinity(0)) // max(1, actors))
        self.embedder = Embedder(ModelConfig(**model))
        self.metrics = embed_metrics(self.embedder.name)  # throughput on the board's Jobs row

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        stages = batch[schema.STAGE].to_pylist()
        errors = batch[schema.ERROR].to_pylist()
        good = [i for i in range(n) if stages[i] is None]
        vectors = np.zeros((n, self.embedder.dim), np.float32)
        model_s = 0.0
        if good:
            crops = self._crops(batch.take(pa.array(good, pa.int64())))
            started = time.perf_counter()
            embedded, failures = self._embed(crops)
            model_s = (time.perf_counter() - started) / len(good)
            vectors[good] = embedded
            for j, reason in failures.items():
                stages[good[j]], errors[good[j]] = EMBED, reason
        ok = np.array([s is None for s in stages], bool)
        embedded = int(ok.sum())
        record(
            self.metrics, embedded=embedded, errors=n - embedded, model_seconds=model_s * len(good)
        )
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1), pa.float32()), self.embedder.dim, mask=pa.array(~ok)
        )
        out = batch.drop_columns([CROP, schema.STAGE, schema.ERROR])
        done = pa.array([time.time() if good else None] * n, pa.float64())
        return (
            out.append_column(schema.EMBEDDING, column)
            .append_column(schema.STAGE, pa.array(stages, pa.string()))
            .append_column(schema.ERROR, pa.array(errors, pa.string()))
            .append_column(EMBEDDED_AT, done)  # for the driver's start-up / steady-rate split
            .append_column(MODEL_SECONDS, pa.array(np.where(ok, model_s, 0.0), pa.float64()))
        )

    def _crops(self, good: pa.Table) -> np.ndarray:
        size = self.embedder.image_size
        flat = good[CROP].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        # Arrow memory is read-only and torch wants writable arrays: one cheap copy per batch
        return np.require(flat.reshape(good.num_rows, size, size, 3), requirements="W")

    def _embed(self, crops: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """Vectors of the crops, and {row: reason} for rows the model failed on."""
        try:
            return self.embedder.embed(crops), {}
        except Exception as batch_error:  # find the culprit instead of losing the batch
            log.warning(
                "batch of %d failed to embed (%s); retrying one by one", len(crops), batch_error
            )
        vectors = np.zeros((len(crops), self.embedder.dim), np.float32)
        failures: dict[int, str] = {}
        for i in range(len(crops)):
            try:
                vectors[i] = self.embedder.embed(crops[i : i + 1])[0]
            except Exception as e:
                failures[i] = _describe(e)
        return vectors, failures


# ---- stage 3: write (CPU tasks) ----------------------------------------------------------------
def write_parts(
    batch: pa.Table,
    *,
    store: Store,
    num_shards: int,
    ingested_at: int,
    router: Router | None = None,
    staging: str | None = None,
    regions: int = 1,
) -> pa.Table:
    """Write a batch's vectors as one Parquet part per shard, and its failures as an errors part.

    Rows are stamped ``ingested_at`` (ms), the plan's time (``PendingInputs.planned_at``), not
    the time of this write: a delete that lands while the job embeds is newer than the row and
    keeps it hidden (``pipelines.embed_plan``), and a retried write rewrites the same part with
    the same stamp.

    A row's shard is its id's (``shards_of``), or in a routed store (``router``) its vector's,
    region rows with their image's (``pipelines.shard_parts``: with ``staging``, the run's
    staging folder, region rows whose image row is in another batch wait there for
    ``place_orphans``; ``regions``: the store's grid levels).
    Batches here are ``part_rows`` rows (MBs), and the driver staged the inputs in shard order,
    so a batch holds one or two shards: parts are large, not one tiny file per shard per batch.
    Returns one row of counts for the driver's summary.
    """
    failed = pc.is_valid(batch[schema.STAGE])
    good = batch.filter(pc.invert(failed))
    bad = batch.filter(failed)
    parts = 0
    if good.num_rows:
        ids = good[schema.ID].to_pylist()
        vectors = schema.arrow_to_vectors(good[schema.EMBEDDING])
        table = schema.embeddings_table(
            ids,
            good[schema.URI].to_pylist(),
            vectors,
            good[schema.WIDTH].to_pylist(),
            good[schema.HEIGHT].to_pylist(),
            ingested_at=pa.scalar(int(ingested_at), schema.TIMESTAMP),
            extra={c: good[c].combine_chunks() for c in metadata_columns(good.column_names)},
        )
        if router is None:
            shards = shards_of(ids, num_shards)
        else:
            all_ids = batch[schema.ID].to_pylist()
            shards, orphan, tail = route_write_batch(ids, vectors, router, all_ids, regions)
            if staging is not None and (orphan.any() or tail.any()):
                tails = pa.table({schema.ID: table[schema.ID], "shard": shards})
                stage_orphans(store, staging, table, orphan, tails.filter(pa.array(tail)))
                table, shards = table.filter(pa.array(~orphan)), shards[~orphan]
        parts = write_shard_parts(store, table, shards)
    images = sum(1 for i in good[schema.ID].to_pylist() if SEPARATOR not in i)
    times = good[EMBEDDED_AT].to_numpy(zero_copy_only=False) if good.num_rows else np.zeros(0)
    err_stages = bad[schema.STAGE].to_pylist()
    if bad.num_rows:
        uris, ids = bad[schema.URI].to_pylist(), bad[schema.ID].to_pylist()
        table = schema.errors_table(uris, bad[schema.ERROR].to_pylist(), err_stages, ids)
        key = part_key([f"{u}\t{i}" for u, i in zip(uris, ids, strict=True)])
        store.write_parquet(table, posixpath.join(store.errors_dir, store.new_part_name(key)))
    return pa.table(
        {
            # images, not rows: an image's region rows (index.rows.regions) are not more images
            "embedded": pa.array([images], pa.int64()),
            "rows": pa.array([good.num_rows], pa.int64()),
            "errors": pa.array([bad.num_rows], pa.int64()),
            "parts": pa.array([parts], pa.int64()),
            "error_stages": pa.array([",".join(err_stages)], pa.string()),
            "first_embedded_at": pa.array([times.min() if len(times) else None], pa.float64()),
            "first_embedded_n": pa.array([int((times == times.min()).sum()) if len(times) else 0]),
            "last_embedded_at": pa.array([times.max() if len(times) else None], pa.float64()),
            "model_seconds": pa.array([pc.sum(batch[MODEL_SECONDS]).as_py() or 0.0], pa.float64()),
        }
    )
