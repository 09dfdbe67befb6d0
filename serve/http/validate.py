"""Request values, one at a time: search parameters, answer shaping, a query vector, a row id.

Values come as strings (query string, multipart form fields) or JSON values and are checked
against the caller's ``Limits``; every refusal is a 422 naming the parameter and its range
(``serve.http.errors``). Parameters ``k``, ``nprobe``, ``rerank``, ``candidates`` and the
answer-shaping options (``index.query.shaping``, all off by default): ``expand`` (true: average
query expansion with the top ``expand_m`` results weighted by ``score ** expand_alpha``),
``diversify`` (MMR; true or a lambda in 0..1), ``dedup`` (collapse near-duplicates; true or a
similarity threshold; each kept result gets ``collapsed``, the ids it stands for),
``exclude_self`` and ``min_score``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.query import shaping
from index.query.filters import Filter
from index.query.shaping import ShapeOptions
from index.rows.metadata import is_unicode
from index.rows.regions import SEPARATOR as REGION_MARK
from serve.config import MAX_K
from serve.http.errors import ApiError
from serve.http.limits import Limits

FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_ID_CHARS = 256


@dataclass
class SearchParams:
    """A search's checked parameters: what every shard group is asked (``serve.planner``)."""

    k: int
    nprobe: int | None
    rerank: bool
    candidates: int | None
    filter: Filter | None = None  # checked against the store's schema (resolve_metadata)
    fields: tuple[str, ...] | None = None  # None: every column of the schema
    shape: ShapeOptions = field(default_factory=ShapeOptions)
    # the most merged hits shaping may fetch and compare (the caller's ``max_shape_pool``)
    max_pool: int = MAX_K
    verify: bool = False  # image queries: re-order by geometric verification (verification.py)
    # a routed store's shards a query visits (None: the router's default; serve.planner.visit)
    shards_probe: int | None = None


def _int_param(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(422, "invalid_parameter", f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ApiError(422, "invalid_parameter", f"{name} must be an integer, got {value!r}")


def _bool_param(name: str, value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ApiError(422, "invalid_parameter", f"{name} must be true or false, got {value!r}")


def validate_params(raw: dict[str, Any], limits: Limits) -> SearchParams:
    """k, nprobe, rerank, candidates (and shaping, verify) from strings or JSON values,
    range-checked."""
    k = _int_param("k", raw.get("k"))
    k = limits.default_k if k is None else k
    if not 1 <= k <= limits.max_k:
        raise ApiError(
            422, "k_out_of_range", limits.over(f"k must be in 1..{limits.max_k}, got {k}")
        )
    nprobe = _int_param("nprobe", raw.get("nprobe"))
    if nprobe is not None and not 1 <= nprobe <= limits.max_nprobe:
        raise ApiError(
            422,
            "nprobe_out_of_range",
            limits.over(f"nprobe must be in 1..{limits.max_nprobe}, got {nprobe}"),
        )
    candidates = _int_param("candidates", raw.get("candidates"))
    if candidates is not None and not 1 <= candidates <= limits.max_candidates:
        raise ApiError(
            422,
            "candidates_out_of_range",
            limits.over(f"candidates must be in 1..{limits.max_candidates}, got {candidates}"),
        )
    rerank = _bool_param("rerank", raw.get("rerank"))
    shards_probe = _int_param("shards_probe", raw.get("shards_probe"))
    if shards_probe is not None and shards_probe < 1:  # the top end is the store's (planner)
        raise ApiError(
            422, "shards_probe_out_of_range", f"shards_probe must be >= 1, got {shards_probe}"
        )
    return SearchParams(
        k,
        limits.default_nprobe if nprobe is None else nprobe,
        True if rerank is None else rerank,
        limits.default_candidates if candidates is None else candidates,
        shape=validate_shape(raw),
        max_pool=limits.max_shape_pool,
        verify=bool(_bool_param("verify", raw.get("verify"))),
        shards_probe=shards_probe,
    )


def _float_param(name: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(422, "invalid_parameter", f"{name} must be a number, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ApiError(
            422, "invalid_parameter", f"{name} must be a number, got {value!r}"
        ) from None
    if not math.isfinite(number):
        raise ApiError(422, "invalid_parameter", f"{name} must be finite, got {value!r}")
    return number


def _switch_or_number(name: str, value: Any, default: float) -> float | None:
    """``true`` -> ``default``, ``false``/absent -> None (off), a number -> that number."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return default if value else None
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "false", "no"):
        return default if value.strip().lower() in ("true", "yes", "on") else None
    return _float_param(name, value)


def validate_shape(raw: dict[str, Any]) -> ShapeOptions:
    """The answer-shaping options (``index.query.shaping``), range-checked; all off when absent."""
    expand_m = _int_param("expand_m", raw.get("expand_m"))
    if expand_m is not None and not 1 <= expand_m <= shaping.MAX_EXPAND_M:
        raise ApiError(
            422,
            "expand_m_out_of_range",
            f"expand_m must be in 1..{shaping.MAX_EXPAND_M}, got {expand_m}",
        )
    alpha = _float_param("expand_alpha", raw.get("expand_alpha"))
    if alpha is not None and not 0 <= alpha <= shaping.MAX_EXPAND_ALPHA:
        raise ApiError(
            422,
            "expand_alpha_out_of_range",
            f"expand_alpha must be in 0..{shaping.MAX_EXPAND_ALPHA:g}, got {alpha}",
        )
    diversify = _switch_or_number("diversify", raw.get("diversify"), shaping.DIVERSIFY_LAMBDA)
    if diversify is not None and not 0 <= diversify <= 1:
        raise ApiError(
            422,
            "diversify_out_of_range",
            f"diversify (MMR lambda) must be in 0..1, got {diversify}",
        )
    dedup = _switch_or_number("dedup", raw.get("dedup"), shaping.DEDUP_THRESHOLD)
    if dedup is not None and dedup <= 0:
        raise ApiError(
            422, "dedup_out_of_range", f"dedup (a similarity threshold) must be > 0, got {dedup}"
        )
    return ShapeOptions(
        expand=bool(_bool_param("expand", raw.get("expand"))),
        expand_m=shaping.EXPAND_M if expand_m is None else expand_m,
        expand_alpha=shaping.EXPAND_ALPHA if alpha is None else alpha,
        diversify=diversify,
        dedup=dedup,
        exclude_self=bool(_bool_param("exclude_self", raw.get("exclude_self"))),
        min_score=_float_param("min_score", raw.get("min_score")),
    )


_NUMBER_TYPES = {int, float}


def validate_vector(value: Any, dim: int, normalise: bool) -> np.ndarray:
    """A JSON list -> (dim,) float32; unit length when the metric is inner product (cosine)."""
    # the checks run in C (a set of the values' types, then numpy): they are on every vector
    # query's path; JSON gives exact int and float (bool is its own type, refused)
    if not isinstance(value, list) or not {*map(type, value)} <= _NUMBER_TYPES:
        raise ApiError(422, "invalid_vector", "vector must be a flat JSON list of numbers")
    if len(value) != dim:
        raise ApiError(
            422,
            "wrong_vector_length",
            f"vector has {len(value)} values; this catalogue's embeddings have {dim}",
        )
    try:
        exact = np.asarray(value, dtype=np.float64)
    except OverflowError:  # an integer past float64 (10**400)
        raise ApiError(422, "non_finite_vector", "vector values overflow float32") from None
    # Python's json reads NaN/Infinity (and 1e999 -> inf); float32 overflow is non-finite too
    if not np.isfinite(exact).all():
        raise ApiError(422, "non_finite_vector", "vector holds NaN or Infinity")
    if np.abs(exact).max(initial=0.0) > FLOAT32_MAX:
        raise ApiError(422, "non_finite_vector", "vector values overflow float32")
    if normalise:
        # the norm and the division in float64: a direction of tiny values (1e-300, which is 0
        # in float32) is still a direction, and huge ones do not overflow when squared
        scale = np.abs(exact).max(initial=0.0)
        if scale == 0.0:
            raise ApiError(422, "zero_vector", "vector is all zeros: it has no direction")
        exact = exact / scale
        exact = exact / np.linalg.norm(exact)
    return exact.astype(np.float32)


def validate_id(value: Any, new: bool = False) -> str:
    """A row id: 1..256 characters, no ``/`` (``/images/{id}`` routes could never name it); a
    ``new`` one (an add's) without ``@r`` either, the mark of an image's region rows
    (``index.rows.regions``), so a writer's row is never taken for another image's region."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS or "/" in value:
        raise ApiError(
            422,
            "invalid_id",
            f"id must be a non-empty string of at most {MAX_ID_CHARS} chars, without '/'",
        )
    if not is_unicode(value):
        raise ApiError(422, "invalid_id", "id is not valid Unicode (a lone surrogate)")
    if new and REGION_MARK in value:
        raise ApiError(
            422, "invalid_id", f"an added image's id may not contain {REGION_MARK!r} (region rows)"
        )
    return value


MAX_TEXT_CHARS = 1000  # a query, not a document (CLIP reads 77 tokens, SigLIP 64)
DEFAULT_TEXT_WEIGHT = 0.5  # a mixed query's text share (serve.deployments.query_model)


def validate_text(value: Any) -> str:
    """A text query: a non-empty string of at most ``MAX_TEXT_CHARS`` characters (the tokenizer
    reads anything, spaces too)."""
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_CHARS:
        raise ApiError(
            422, "invalid_text", f"text must be a string of 1..{MAX_TEXT_CHARS} characters"
        )
    if not is_unicode(value):
        raise ApiError(422, "invalid_text", "text is not valid Unicode (a lone surrogate)")
    return value


def validate_text_weight(value: Any) -> float | None:
    """``text_weight`` of a mixed query: a number in 0..1 (form fields: its decimal text)."""
    weight = _float_param("text_weight", value)
    if weight is not None and not 0.0 <= weight <= 1.0:
        raise ApiError(422, "invalid_parameter", "text_weight must be in 0..1")
    return weight
