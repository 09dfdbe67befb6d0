"""pipelines/build_index.py: config from YAML + flags, and a real build through Ray tasks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.stores import write_store
from harness.synthetic import gaussian_mixture
from index.ann.shard_index import ShardIndex
from index.storage.manifest import load_manifest
from pipelines.build_index import BuildConfig, load_config, main, run

ROOT = Path(__file__).resolve().parents[1]


def test_config_from_yaml_overridden_by_flags(tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text("store: /data/s\nmemory_budget: 2G\nshards: [0, 2]\nnum_cpus: 0.25\n")
    config = load_config(["--config", str(path), "--memory-budget", "1G", "--threads", "2"])
    assert config.store == "/data/s" and config.memory_budget == "1G"
    assert config.shards == [0, 2] and config.num_cpus == 0.25 and config.task_threads == 2
    assert load_config(["--store", "x", "--shards", "3"]).shards == [3]
    assert BuildConfig(store="x", num_cpus=0.5).task_threads == 1
    (tmp_path / "bad.yaml").write_text("store: x\nnprobe: 3\n")
    with pytest.raises(SystemExit):
        load_config(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit):
        load_config(["--store", "x", "--memory-budget", "lots"])
    with pytest.raises(SystemExit):
        load_config([])  # no store


def test_script_runs_as_a_file_from_the_repo_root():
    out = subprocess.run(
        [sys.executable, "pipelines/build_index.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--memory-budget" in out.stdout


@pytest.mark.slow
def test_build_job_on_ray_then_noop_rerun(ray_local, tmp_path, capsys):
    vectors = gaussian_mixture(3000, 32, clusters=30, seed=5)
    ids = [f"row-{i}" for i in range(len(vectors))]
    store = write_store(tmp_path / "s", ids, [f"mem://{i}" for i in ids], vectors, num_shards=3)

    summary = run(BuildConfig(store=str(store.root), num_cpus=0.5, progress=False))
    assert summary.built == {0: 1, 1: 1, 2: 1} and not summary.failed
    assert summary.vectors == 3000
    loaded = [ShardIndex.load(store, s) for s in range(3)]
    assert sum(s.count for s in loaded) == 3000
    assert all(s.meta["kind"] == "ivfpq" for s in loaded)

    sequence = load_manifest(store).sequence
    again = run(BuildConfig(store=str(store.root), progress=False))
    assert again.built == {} and sorted(again.skipped) == [0, 1, 2]
    assert load_manifest(store).sequence == sequence  # a true no-op

    assert main(["--store", str(store.root), "--shards", "1", "--force", "--no-progress"]) == 0
    assert "built 1 shard(s)" in capsys.readouterr().out
    manifest = load_manifest(store)
    assert manifest.shards[1].version == 2 and manifest.shards[0].version == 1
