"""``visual-search``, the console script: help and exit statuses, then every job end to end.

The end-to-end test runs the installed console script as a user does, each step a process of
its own: ``embed`` a handful of Caltech photos into 2 shards, ``build`` the indexes, ``serve``
in the background (its own local Ray, bound to 127.0.0.1), ``search`` by image, id and vector,
``stats``; then it stops ``serve`` with SIGTERM and checks that no process of any of the Rays
these commands started is left (they run in new sessions with their own temp dirs).
``ray job submit -- visual-search build`` on a ``ray start --head`` is in test_cluster_ops.py
(its head's build job), which saves this module a head of its own.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import httpx
import numpy as np
import pytest

from harness import embed_samples as samples
from harness.polling import free_port, wait_for
from harness.ray_head import ROOT, processes_of, ray_env, stop_processes
from visual_search import exits
from visual_search.cli import COMMANDS, main
from visual_search.query_cli import format_results


def console_script(env: dict[str, str]) -> str:
    """The ``visual-search`` that ``pip install -e .`` put next to this Python (or on PATH)."""
    found = shutil.which("visual-search", path=env["PATH"])
    assert found, "no visual-search console script: pip install -e . (scripts/bootstrap.sh)"
    return found


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == exits.OK
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"\n  {name} " in out
    assert "4     REFUSED" in out
    assert main([]) == exits.USAGE and "commands:" in capsys.readouterr().err
    assert main(["bogus"]) == exits.USAGE


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_has_help(name, capsys):
    assert main([name, "--help"]) == exits.OK
    assert capsys.readouterr().out.startswith(f"usage: visual-search {name} ")


def test_exit_statuses_without_a_server(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("VISUAL_SEARCH_STORE", raising=False)
    monkeypatch.delenv("VISUAL_SEARCH_SERVE_CONFIG", raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["search", "--url", dead]) == exits.USAGE  # no query given
    assert main(["search", "--id", "x", "--url", dead]) == exits.UNREACHABLE
    assert main(["stats", "--url", dead]) == exits.UNREACHABLE
    assert main(["search", str(tmp_path / "missing.jpg"), "--url", dead]) == exits.USAGE
    assert main(["serve"]) == exits.USAGE  # no store
    assert main(["serve", "--store", str(tmp_path), "--detach"]) == exits.USAGE
    assert main(["build"]) == exits.USAGE
    err = capsys.readouterr().err
    assert "unreachable" in err and "no store" in err


def test_results_table_shows_metadata_columns():
    body = {
        "results": [
            {"id": "a", "uri": "/p/a.jpg", "score": 0.99, "shard": 1, "tags": ["x"]},
            {"id": "b", "uri": "/p/b.jpg", "score": 0.5, "shard": 0},
        ],
        "took_ms": 3.2,
        "shards_answered": 2,
        "shards_total": 2,
    }
    lines = format_results(body).splitlines()
    assert lines[0].split() == ["rank", "score", "shard", "id", "uri", "tags"]
    assert lines[1].split() == ["1", "0.9900", "1", "a", "/p/a.jpg", '["x"]']
    assert lines[-1] == "2 results in 3.2 ms, 2/2 shards"


def run(
    cmd: list[str], env: dict, marker: str, timeout_s: float = 600
) -> subprocess.CompletedProcess:
    """Run one command in a session of its own; fail with its output unless it exits 0, and
    check that whatever Ray it started is gone with it."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"{' '.join(cmd[1:3])} exited {proc.returncode}:\n{err[-4000:]}"
    wait_for(lambda: not processes_of(proc.pid, marker), 60, f"{cmd[1]}'s Ray to exit")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_embed_build_serve_search_end_to_end(caltech_dir, scratch_root, tmp_path):
    work = scratch_root / "cli"  # short: Ray's socket paths must stay < 108 bytes
    work.mkdir()
    env = ray_env(TMPDIR=str(work))  # a Ray a job starts on its own puts its session here
    cli = console_script(env)
    photos = samples.link_images(
        samples.caltech_subset(caltech_dir, 6, per_class=2), tmp_path / "p"
    )
    store = str(tmp_path / "store")

    embed = run(
        [cli, "embed", str(tmp_path / "p"), "--store", store, "--num-shards", "2",
         "--batch-size", "4", "--actors", "1", "--ray-temp-dir", str(work / "embed")],
        env, str(work),
    )  # fmt: skip
    assert "embedded 6 images (0 skipped as already present), 0 errors" in embed.stdout
    build = run(
        [cli, "build", "--store", store, "--address", "local", "--num-cpus", "0.5"], env, str(work)
    )
    assert "built 2 shard(s) (6 vectors)" in build.stdout and "0 failed" in build.stdout

    port, serve_tmp = free_port(), work / "serve"
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [cli, "serve", "--store", store, "--port", str(port), "--ray-temp-dir", str(serve_tmp),
             "--set", "reload_interval_s=0"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(
            lambda: server.poll() is not None or "search page" in log_path.read_text(),
            300,
            "visual-search serve to print its URLs",
        )
        assert server.poll() is None, log_path.read_text()[-4000:]
        url = f"http://127.0.0.1:{port}"
        assert f"search page  {url}/" in log_path.read_text()
        assert httpx.get(url + "/", timeout=30).status_code == 200

        def search(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [cli, "search", *args, "--url", url], env=env, capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip

        table = search(str(photos[0]), "--k", "3")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:5] == ["rank", "score", "shard", "id", "uri"]
        assert lines[1].split()[4] == str(photos[0]) and len(lines) == 5  # itself first

        by_image = json.loads(search(str(photos[1]), "--json").stdout)
        first = by_image["results"][0]
        assert first["uri"] == str(photos[1]) and first["score"] > 0.99
        by_id = json.loads(search("--id", first["id"], "--k", "2", "--json").stdout)
        assert [r["id"] for r in by_id["results"]][:1] == [first["id"]]

        stats = subprocess.run(
            [cli, "stats", "--url", url, "--json"], env=env, capture_output=True, text=True
        )
        assert stats.returncode == 0 and json.loads(stats.stdout)["total_count"] == len(photos)
        vector = np.random.default_rng(0).standard_normal(json.loads(stats.stdout)["dim"])
        np.save(tmp_path / "q.npy", vector.astype(np.float32))
        by_vector = search("--vector", str(tmp_path / "q.npy"), "--k", "4", "--json")
        assert by_vector.returncode == 0 and len(json.loads(by_vector.stdout)["results"]) == 4
        text = subprocess.run([cli, "stats", "--url", url], env=env, capture_output=True, text=True)
        assert f"{len(photos)} rows in 2 shards" in text.stdout

        unknown = search("--id", "no-such-id")
        assert unknown.returncode == exits.REFUSED and "unknown_id" in unknown.stderr

        server.send_signal(signal.SIGTERM)  # as a service manager stops it
        assert server.wait(timeout=120) == 0, log_path.read_text()[-4000:]
        assert "stopping" in log_path.read_text()
        wait_for(lambda: not processes_of(server.pid, str(serve_tmp)), 60, "serve's Ray to exit")
    finally:
        if server.poll() is None:
            server.kill()
        stop_processes(server.pid, str(serve_tmp), grace_s=0.0)
