"""The embedding job's parts without Ray: settings, input listing, decode stage, part names."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from embedding import decode_image, prepare
from harness import embed_samples as samples
from pipelines.embed_config import ConfigError, EmbedJobConfig, config_from_args
from pipelines.embed_stages import CROP, part_key, read_decode_batch
from pipelines.inputs import expand_inputs
from pipelines.uris import InputError, canonical_uri


# ---- settings ----------------------------------------------------------------------------------
def test_config_defaults_yaml_and_flags_precedence(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: [a, b]\nbatch-size: 8\nactors: 2\nstore: s3://bucket/x\ndedup: true\n")
    config = config_from_args(["--config", str(job), "--batch-size", "16"])
    assert config.input == ["a", "b"] and config.store == "s3://bucket/x"
    assert (config.batch_size, config.actors, config.dedup) == (16, 2, True)  # flag wins
    plain = config_from_args(["imgs"])
    assert plain.store == "./store" and plain.num_shards is None and plain.actors is None
    assert plain.model == "efficientnet_lite0" and plain.batch_size is None
    flagged = config_from_args(["--input", "s3://b/x", "imgs", "--input", "more"])
    assert flagged.input == ["imgs", "s3://b/x", "more"]  # --input adds to the positional ones
    assert config_from_args(["--config", str(job)]).input == ["a", "b"]  # YAML kept when no flag


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "input"),
        (["x", "--batch-size", "0"], "batch_size"),
        (["x", "--actor-cpus", "0"], "actor_cpus"),
        (["x", "--num-gpus", "-1"], "num_gpus"),
        (["x", "--model", "nope"], "model"),
    ],
)
def test_config_errors_name_the_setting(argv, message):
    with pytest.raises(ConfigError, match=message):
        config_from_args(argv)


def test_config_yaml_errors(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("input: x\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'batchsize'"):
        config_from_args(["--config", str(bad_key)])
    bad_type = tmp_path / "b.yaml"
    bad_type.write_text("input: x\nactors: two\n")
    with pytest.raises(ConfigError, match="actors"):
        config_from_args(["--config", str(bad_type)])
    with pytest.raises(ConfigError, match="dedup"):
        EmbedJobConfig(input=["x"], dedup="yes")


# ---- inputs ------------------------------------------------------------------------------------
def test_inputs_folder_glob_list_and_uri_spellings(tmp_path, monkeypatch):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.JPG", "a.png", "sub/c.jpeg", "notes.txt", "sub/.DS_Store"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    folder = sorted(str(tmp_path / "imgs" / n) for n in ("a.png", "b.JPG", "sub/c.jpeg"))
    assert expand_inputs([str(tmp_path / "imgs")]) == folder  # only image extensions
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["imgs"]) == folder == expand_inputs([f"file://{tmp_path}/imgs"])
    assert expand_inputs([f"{tmp_path}/imgs/**/*.jpeg"]) == [str(tmp_path / "imgs/sub/c.jpeg")]
    assert expand_inputs(["imgs/notes.txt"]) == [str(tmp_path / "imgs/x")]  # a list file
    listing = tmp_path / "list.lst"
    listing.write_text(f"# comment\nimgs/a.png\n\n{tmp_path}/imgs/notes.txt\nmissing.jpg\n")
    assert expand_inputs([str(listing)]) == [
        str(tmp_path / "imgs/a.png"),
        str(tmp_path / "imgs/notes.txt"),  # as-is: no extension filter, no existence check
        str(tmp_path / "missing.jpg"),
    ]
    # the same file named twice is one input
    assert expand_inputs(["imgs/a.png", str(tmp_path / "imgs/a.png")]) == [folder[0]]
    with pytest.raises(InputError, match="no such file"):
        expand_inputs(["nothing-here"])
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs(["imgs/*.webp"])
    assert canonical_uri("s3://bucket/a.jpg") == "s3://bucket/a.jpg"
    assert canonical_uri("file:///x/../y.jpg") == "/y.jpg"


# ---- decode stage ------------------------------------------------------------------------------
def test_read_decode_batch_turns_every_failure_into_an_error_row(tmp_path, caltech_dir):
    real = samples.class_photos(caltech_dir)[0].read_bytes()
    bad = samples.bad_files(real)
    odd = samples.odd_valid_files()
    paths = samples.write_files(tmp_path, {k: v[0] for k, v in bad.items()})
    paths += samples.write_files(tmp_path, odd)
    uris = [str(p) for p in paths] + [str(tmp_path / "vanished.jpg"), str(tmp_path)]
    batch = pa.table({"uri": uris, "id": [f"id{i}" for i in range(len(uris))]})
    out = read_decode_batch(
        batch, image_size=224, resize_size=256, max_pixels=50_000_000, max_bytes=1 << 25
    )
    rows = {os.path.basename(r["uri"]) or r["uri"]: r for r in out.drop([CROP]).to_pylist()}
    assert out.num_rows == len(uris) and out["id"].to_pylist() == batch["id"].to_pylist()
    for name, (_, reason) in bad.items():
        assert rows[name]["stage"] == "decode" and rows[name]["error"].startswith(reason), name
    assert (
        rows["vanished.jpg"]["stage"] == "read"
        and "FileNotFoundError" in rows["vanished.jpg"]["error"]
    )
    assert rows[tmp_path.name]["stage"] == "read"
    for name in odd:
        assert rows[name]["stage"] is None, (name, rows[name]["error"])
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (200, 400)
    crops = out[CROP]
    assert crops.null_count == len(bad) + 2
    valid = out.filter(pc.is_null(out["stage"]))
    flat = valid[CROP].combine_chunks().flatten().to_numpy()
    assert flat.reshape(-1, 224, 224, 3).shape[0] == len(odd)


def test_a_weights_file_loads_whole_and_is_named_by_its_content(weights_dir, tmp_path):
    """``weights=<.pth>`` in torchvision's key names: every tensor lands in the backbone, the
    tag is the file's name and content hash, and a file for another network is refused."""
    import hashlib

    import torch

    from embedding.backbones import load_backbone

    path = weights_dir / "mobilenet_v2-imagenet-features.pth"
    backbone = load_backbone("mobilenet_v2", str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert backbone.weights_tag == f"file:{path.name}:{digest}"
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = backbone.module.state_dict()
    assert state and all(torch.equal(own[key], value) for key, value in state.items())
    with torch.no_grad():
        features = backbone.module.eval()(torch.rand(2, 3, 224, 224))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    torch.save({"layer1.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone("mobilenet_v2", str(tmp_path / "other.pth"))


def test_jpeg_draft_decode_keeps_orientation_and_pixels():
    """A draft (DCT-scaled) decode gives the full decode's crop, EXIF rotation included."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    samples.photo(4, (1600, 1000)).save(buf, "JPEG", quality=92, exif=exif)
    data = buf.getvalue()
    full = decode_image(data)
    draft = decode_image(data, draft_size=256)
    assert full.size == (1000, 1600) and full.info["source_size"] == (1000, 1600)
    assert draft.size[0] < full.size[0] and min(draft.size) >= 256  # decoded at 1/2 or 1/4 scale
    assert draft.info["source_size"] == (1000, 1600)  # the picture's real, upright size
    a = prepare(full, 224).astype(np.int16)
    b = prepare(draft, 224).astype(np.int16)
    assert np.abs(a - b).mean() < 3.0  # same picture, same orientation, same crop


def test_part_key_is_order_free_and_content_bound():
    assert part_key(["b", "a"]) == part_key(["a", "b"]) != part_key(["a", "c"])
    assert len(part_key(["x"])) == 24


# ---- planning: what a run still has to do, per shard -------------------------------------------
@pytest.mark.parametrize("bucket_rows", [65_536, 7])  # whole shards, and buckets of 7 inputs
def test_plan_drops_repeats_failures_and_stored_ids_per_shard(tmp_path, monkeypatch, bucket_rows):
    from pipelines import embed_plan

    monkeypatch.setattr(embed_plan, "BUCKET_ROWS", bucket_rows)
    from harness.stores import write_store
    from index.live.parts import write_tombstones
    from index.rows import schema
    from index.rows.sharding import shard_of, uri_id
    from pipelines.embed_plan import PlanCounts, ShardSpill, chunks, plan_pending, read_block

    uris = [f"file:///photos/{i:03d}.jpg" for i in range(60)]
    store = write_store(
        tmp_path / "s",
        [uri_id(u) for u in uris[:20]],  # the first 20 are stored already
        uris[:20],
        np.eye(60, 8, dtype=np.float32)[:20] + 0.1,
        3,
    )
    failed = pa.array(uris[20:25])  # recorded as failed by an earlier run
    write_tombstones(store, shard_of(uri_id(uris[30]), 3), [uri_id(uris[30])])  # deleted: not new
    spill = ShardSpill(3, str(tmp_path))
    counts = PlanCounts()
    for chunk in chunks(uris + uris[50:], size=16):  # the last ten listed twice
        counts.inputs += len(chunk)
        spill.add_rows(chunk, [uri_id(u) for u in chunk])
    spill.finish()
    pending = plan_pending(store, spill, counts, failed=failed, limit=30, block_rows=4)
    spill.close()
    assert (counts.inputs, counts.duplicates) == (70, 10)
    assert (counts.skipped_present, counts.skipped_failed) == (21, 5)
    assert counts.pending == pending.rows == 30 and counts.deferred == 4  # --limit 30
    assert [f[0] for f in pending.files] == sorted({f[0] for f in pending.files})  # shard order
    rows = []
    starts = pending.starts()
    for block in range(pending.blocks):  # what the job's Ray Data blocks read, in order
        table = read_block({"id": np.array([block])}, store=store, pending=pending, starts=starts)
        assert 1 <= table.num_rows <= 4
        shards = {shard_of(i, 3) for i in table[schema.ID].to_pylist()}
        assert len(shards) == 1  # a block never mixes shards
        rows += table[schema.URI].to_pylist()
    assert len(rows) == len(set(rows)) == 30 and set(rows) <= set(uris[25:]) - {uris[30]}
    assert all(store.exists(f[1]) for f in pending.files)  # staged in the store itself
