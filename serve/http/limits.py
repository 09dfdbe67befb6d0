"""What a caller may ask for: the request limits, and the lower caps of anonymous callers.

A keyed caller (``serve.http.security``) may ask ``nprobe``, ``candidates`` and image pixels up to
the config's ``max_*``; a caller without the key only up to the ``anon_max_*`` caps, and a refusal
by those caps says that the key lifts them (``Limits.hint``).
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.config import ServeConfig


@dataclass
class Limits:
    default_k: int = 10
    default_nprobe: int | None = None
    default_candidates: int | None = None
    max_nprobe: int = 65536
    max_candidates: int = 10000
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    hint: str = ""  # appended to a refusal by these caps (anonymous callers: the key lifts them)

    def over(self, text: str) -> str:
        """A refusal's text by these caps, with the hint."""
        return f"{text} ({self.hint})" if self.hint else text


def limits_for(config: ServeConfig, keyed: bool) -> Limits:
    """The request limits of a keyed or an anonymous caller."""
    limits = Limits(
        default_k=config.default_k,
        default_nprobe=config.default_nprobe,
        default_candidates=config.default_candidates,
        max_nprobe=config.max_nprobe,
        max_candidates=config.max_candidates,
        max_upload_bytes=config.max_upload_bytes,
        max_pixels=config.max_pixels,
    )
    if keyed:
        return limits
    lowered = (
        (config.anon_max_nprobe, config.max_nprobe),
        (config.anon_max_candidates, config.max_candidates),
        (config.anon_max_pixels, config.max_pixels),
    )
    limits.max_nprobe, limits.max_candidates, limits.max_pixels = (min(a, m) for a, m in lowered)
    if any(a < m for a, m in lowered):
        limits.hint = "the cap for callers without the API key; the key raises it"
    return limits
