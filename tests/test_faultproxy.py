"""The object-store fault proxy (``harness.faultproxy``): it really injects each kind of fault
between s3fs and moto's S3 server, and a seed replays the same faults."""

from __future__ import annotations

import pytest

from harness.faultproxy import KINDS, FaultProxy, FaultRates, FaultSchedule


def decisions(seed: int, n: int = 400) -> list[str | None]:
    schedule = FaultSchedule(seed, FaultRates(0.1, 0.05, 0.05, 0.05, 0.05))
    return [schedule.decide("GET", f"/bucket/key-{i % 7}")[0] for i in range(n)]


def test_a_seed_replays_its_schedule():
    assert decisions(7) == decisions(7)
    assert decisions(7) != decisions(8)
    assert set(decisions(7)) == {None, *KINDS}


def test_the_nth_request_decides_not_the_arrival_order():
    """Concurrent clients interleave differently each run: the n-th GET of one key gets the same
    decision whatever came between."""
    a = FaultSchedule(3, FaultRates(0.3, 0.1, 0.1, 0.1, 0.1))
    b = FaultSchedule(3, FaultRates(0.3, 0.1, 0.1, 0.1, 0.1))
    first = [a.decide("GET", "/b/x")[0] for _ in range(50)]
    for i in range(50):  # b sees other keys in between
        b.decide("PUT", f"/b/other-{i}")
    assert [b.decide("GET", "/b/x")[0] for _ in range(50)] == first


def seen(proxy: FaultProxy) -> set[str]:
    return {kind for kind in KINDS if proxy.counts[kind]}


def test_faults_reach_the_client_and_writes_survive_them(s3_server):
    """Through the proxy at high fault rates, s3fs (with botocore's retries) still writes and
    reads every object, and the proxy counted faults of every kind."""
    import s3fs

    bucket = s3_server.new_bucket()
    rates = FaultRates(delay=0.1, reset=0.03, drop=0.03, error_500=0.04, error_503=0.04)
    proxy = FaultProxy(s3_server.endpoint, FaultSchedule(11, rates)).start()
    wanted = {"delay", "500", "503"}
    try:
        fs = s3fs.S3FileSystem(
            skip_instance_cache=True,
            config_kwargs={"retries": {"max_attempts": 10, "mode": "standard"}},
            **proxy.storage_options,
        )
        # each request's fault is drawn from (seed, request, nth), but which requests a run
        # makes follows the faults' timing (retries): at 30 keys a run without a 500 came up
        # (~5 %), so writes go on past 30 until every asserted kind was injected (at most 200)
        written = 0
        while written < 30 or (not wanted <= seen(proxy) and written < 200):
            fs.pipe_file(f"{bucket}/k/{written}", f"value {written}".encode())
            written += 1
        assert sorted(fs.cat_file(f"{bucket}/k/{i}") for i in range(written)) == sorted(
            f"value {i}".encode() for i in range(written)
        )
    finally:
        proxy.stop()
    assert proxy.counts["requests"] >= 2 * written
    assert proxy.faults_injected >= 5
    assert seen(proxy) >= wanted


def test_an_unretried_client_sees_the_fault(s3_server):
    """With retries off, an injected 503 surfaces as an error: the proxy is not a no-op."""
    import s3fs

    bucket = s3_server.new_bucket()
    proxy = FaultProxy(
        s3_server.endpoint, FaultSchedule(1, FaultRates(0, 0, 0, 0, error_503=1.0))
    ).start()
    try:
        fs = s3fs.S3FileSystem(
            skip_instance_cache=True,
            config_kwargs={"retries": {"max_attempts": 1}},
            **proxy.storage_options,
        )
        fs.retries = 1  # s3fs's own retry loop, over botocore's
        with pytest.raises(OSError):
            fs.pipe_file(f"{bucket}/x", b"x")
    finally:
        proxy.stop()
    assert proxy.counts["503"] >= 1
