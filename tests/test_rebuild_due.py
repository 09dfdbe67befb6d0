"""When the Rebuilder rebuilds a shard (``serve.deployments.rebuilder.rebuild_due``): by rows,
by the built rows' fraction, by the bytes every query scans in the delta, by the parts a new
replica reads one round trip each (review 3, issue #24.4)."""

from __future__ import annotations

import pytest

from serve.config import ConfigError, ServeConfig
from serve.deployments.rebuilder import rebuild_due


def delta(rows=0, parts=0, tombstone_parts=0, base_count=1_000_000) -> dict:
    return {
        "rows": rows,
        "parts": parts,
        "tombstone_parts": tombstone_parts,
        "base_count": base_count,
    }


def test_each_rule_fires_alone_and_zero_turns_it_off():
    c = ServeConfig(store="/nowhere")
    assert rebuild_due(delta(), 256, c) is None
    assert rebuild_due(delta(rows=10, parts=1), 256, c) is None
    assert "rows" in rebuild_due(delta(rows=100_000, parts=1), 64, c)
    assert "%" in rebuild_due(delta(rows=600, parts=1, base_count=5000), 64, c)
    # 64 MiB of float32: 13,108 rows at 1280-d are due, the same rows at 256-d are not
    assert "1280-d" in rebuild_due(delta(rows=13_108, parts=3), 1280, c)
    assert rebuild_due(delta(rows=13_108, parts=3), 256, c) is None
    # a thousand one-row parts (the API's writes): due for the parts alone
    assert "parts" in rebuild_due(delta(rows=999, parts=999, tombstone_parts=1), 64, c)
    off = ServeConfig(
        store="/nowhere",
        rebuild_delta_rows=0,
        rebuild_delta_fraction=0,
        rebuild_delta_bytes="0",
        rebuild_delta_parts=0,
    )
    assert rebuild_due(delta(rows=10**7, parts=10**5, base_count=1), 1280, off) is None
    with pytest.raises(ConfigError, match="rebuild_delta_bytes"):
        ServeConfig(store="/nowhere", rebuild_delta_bytes="lots").validate()
