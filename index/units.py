"""Byte sizes as people write them (``"16G"``, ``"512M"``, ``"1.5g"``, ``"2GiB"``, ``1024``):
the one parser for memory budgets, cache bounds and part sizes, in config files, environment
variables and command-line flags alike.

A leaf: it imports nothing from the project, so every floor may use it.
"""

from __future__ import annotations

import re

_MEMORY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}


def parse_bytes(text: str | int) -> int:
    """``"4G"``, ``"512M"``, ``"16GB"``, ``"1.5g"``, ``"2GiB"``, ``1024`` -> bytes (binary units,
    as Ray and Kubernetes-style memory sizes are read here: 1G = 2**30)."""
    if isinstance(text, bool):
        raise ValueError(f"not a memory size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"memory size must be >= 0, got {text}")
        return text
    match = _MEMORY_RE.match(str(text))
    if not match:
        raise ValueError(f"not a memory size: {text!r} (expected e.g. '4G', '512M', '1.5g')")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])
