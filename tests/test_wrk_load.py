"""harness.wrk_load: the script wrk runs and the report it prints, read back (wrk itself is a
benchmark tool, not installed in CI)."""

from __future__ import annotations

import pytest

from harness.wrk_load import lua_script, parse_wrk

REPORT = """\
Running 20s test @ http://127.0.0.1:30001
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    96.10ms   29.20ms 226.31ms   76.07%
    Req/Sec    83.48     26.51   161.00     69.17%
  Latency Distribution
     50%   90.57ms
     75%  108.55ms
     90%  133.06ms
     99%    1.20s
  3322 requests in 20.01s, 5.13MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:    166.06
Transfer/sec:    262.31KB
"""


def test_the_report_is_read_in_milliseconds_with_errors_counted():
    got = parse_wrk(REPORT, 20)
    assert (got["p50_ms"], got["p75_ms"], got["p90_ms"]) == (90.57, 108.55, 133.06)
    assert got["p99_ms"] == 1200.0  # seconds scaled, not read as ms
    assert (got["requests"], got["qps"], got["non_2xx"], got["socket_errors"]) == (
        3322,
        166.1,
        4,
        3,
    )


def test_a_report_without_a_latency_distribution_is_refused():
    with pytest.raises(ValueError, match="no latency distribution"):
        parse_wrk(REPORT.split("  Latency Distribution")[0], 20)


def test_the_script_posts_each_body_in_turn_to_the_path():
    script = lua_script("/search", ['{"vector": [[1]], "k": 1}', '{"id": "a"}'])
    assert "wrk.format('POST', '/search', headers, bodies[i])" in script
    assert '[==[{"vector": [[1]], "k": 1}]==]' in script  # ]] inside a body is safe
    assert "i = i % #bodies + 1" in script
    with pytest.raises(ValueError, match="closing bracket"):
        lua_script("/search", ["x]==]y"])
