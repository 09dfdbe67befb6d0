"""Answer shaping (``index.query.shaping``), its HTTP parameters (``serve.http.validate``) and the
client's encoding of them; and the recall canary's arithmetic (``serve.deployments.canary``). No
Ray, no FAISS."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from index.query import shaping
from index.query.hits import Hit
from index.query.shaping import ShapeOptions, collapse, drop_self, expanded_query, mmr, shape
from serve.deployments.canary import RecallWindow, recall_at_k
from serve.http.errors import ApiError
from serve.http.limits import Limits
from serve.http.validate import validate_params
from visual_search.client import SearchClient
from visual_search.query_cli import format_results


def unit(rows) -> np.ndarray:
    x = np.asarray(rows, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def hits_for(query: np.ndarray, vectors: np.ndarray, names: list[str]) -> list[Hit]:
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")
    return [Hit(names[i], f"/{names[i]}", float(scores[i]), 0) for i in order]


@pytest.fixture
def scene():
    """Three near-copies of photo a, two of b, one c: a query closest to the a's."""
    rng = np.random.default_rng(0)
    a, b, c = unit(rng.standard_normal((3, 16)))
    vectors = unit(
        [a, a + 0.05 * rng.standard_normal(16), a + 0.05 * rng.standard_normal(16), b, b + 0.05, c]
    )
    names = ["a0", "a1", "a2", "b0", "b1", "c0"]
    query = unit(a + 0.6 * b + 0.3 * c)
    hits = hits_for(query, vectors, names)
    return query, hits, dict(zip(names, vectors, strict=True))


def test_collapse_keeps_the_best_of_each_near_duplicate_group(scene):
    query, hits, vectors = scene
    matrix = np.stack([vectors[h.id] for h in hits])
    heads, members = collapse(hits, matrix, 0.95)
    assert sorted(hits[i].id[0] for i in heads) == ["a", "b", "c"]  # one per photo
    groups = {
        hits[h].id[0]: sorted(hits[m].id for m in ms) for h, ms in zip(heads, members, strict=True)
    }
    assert len(groups["a"]) == 2 and len(groups["b"]) == 1 and groups["c"] == []
    assert heads == sorted(heads)  # rank order kept: a head is its group's best


def test_shape_dedup_reports_what_each_result_stands_for(scene):
    query, hits, vectors = scene
    out = shape(hits, 10, ShapeOptions(dedup=0.95), vectors=vectors)
    assert len(out) == 3
    assert sum(len(s.collapsed) for s in out) == 3
    assert [s.hit.id[0] for s in out] == [h.id[0] for h in hits if h.id in {s.hit.id for s in out}]


def test_mmr_lambda_one_is_the_plain_ranking_and_low_lambda_spreads(scene):
    query, hits, vectors = scene
    matrix = np.stack([vectors[h.id] for h in hits])
    assert mmr(hits, matrix, 6, 1.0) == list(range(6))
    top3 = {hits[i].id[0] for i in mmr(hits, matrix, 3, 0.3)}
    assert top3 == {"a", "b", "c"}  # one of each photo before any second copy
    plain3 = {h.id[0] for h in hits[:3]}
    assert len(plain3) < 3


def test_expanded_query_is_the_normalised_weighted_mean():
    q = unit([1.0, 0.0, 0.0])
    x = unit([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    plain = expanded_query(q, x, [0.5, 0.5], alpha=0.0)
    np.testing.assert_allclose(plain, unit([1.0, 1.0, 1.0]), rtol=1e-6)
    weighted = expanded_query(q, x, [1.0, 0.5], alpha=1.0)
    np.testing.assert_allclose(weighted, unit([1.0, 1.0, 0.5]), rtol=1e-6)
    assert np.isclose(np.linalg.norm(weighted), 1.0)
    np.testing.assert_array_equal(expanded_query(q, x[:0], []), q)
    l2 = expanded_query([1.0, 1.0], [[3.0, 1.0]], [0.2], metric="l2")
    np.testing.assert_allclose(l2, [2.0, 1.0])


def test_exclude_self_min_score_and_their_order():
    hits = [
        Hit("me", "", 1.0, 0),
        Hit("x", "", 0.9995, 0),
        Hit("y", "", 0.7, 1),
        Hit("z", "", 0.2, 1),
    ]
    assert [h.id for h in drop_self(hits, "ip", {"me"})] == ["x", "y", "z"]
    assert [h.id for h in drop_self(hits, "ip")] == ["y", "z"]  # identical vectors too
    out = shape(hits, 2, ShapeOptions(exclude_self=True, min_score=0.5), self_ids={"me"})
    assert [s.hit.id for s in out] == ["x", "y"]
    l2 = [Hit("same", "", 0.0, 0), Hit("near", "", 0.4, 0), Hit("far", "", 3.0, 0)]
    assert [s.hit.id for s in shape(l2, 5, ShapeOptions(min_score=1.0), "l2")] == ["same", "near"]
    assert [h.id for h in drop_self(l2, "l2")] == ["near", "far"]


def test_fetch_k_leaves_room_for_what_shaping_removes():
    assert ShapeOptions().fetch_k(10, 1000) == 10 and not ShapeOptions().active
    assert ShapeOptions(dedup=0.9).fetch_k(10, 1000) == 40
    assert ShapeOptions(diversify=0.5).fetch_k(2, 1000) == 22
    assert ShapeOptions(exclude_self=True).fetch_k(10, 1000) == 11
    assert ShapeOptions(expand=True, expand_m=30).fetch_k(10, 1000) == 30
    assert ShapeOptions(dedup=0.9).fetch_k(900, 1000) == 1000
    with pytest.raises(ValueError):
        ShapeOptions(diversify=1.5)


# ---- the HTTP parameters -------------------------------------------------------------------
def test_params_parse_switches_numbers_and_defaults():
    shape_of = lambda **raw: validate_params(raw, Limits()).shape  # noqa: E731
    assert shape_of() == ShapeOptions()
    assert shape_of(expand="true").expand and shape_of(expand=True).expand_m == shaping.EXPAND_M
    assert shape_of(diversify="true").diversify == shaping.DIVERSIFY_LAMBDA
    assert shape_of(diversify="0").diversify == 0.0  # lambda 0 is a value, not "off"
    assert shape_of(diversify=False).diversify is None
    assert shape_of(dedup=True).dedup == shaping.DEDUP_THRESHOLD
    assert shape_of(dedup="0.8").dedup == 0.8
    opts = shape_of(expand_m="5", expand_alpha="0", exclude_self="1", min_score="0.25")
    assert (opts.expand_m, opts.expand_alpha, opts.exclude_self, opts.min_score) == (
        5,
        0.0,
        True,
        0.25,
    )


@pytest.mark.parametrize(
    "raw, error",
    [
        ({"expand_m": "0"}, "expand_m_out_of_range"),
        ({"expand_m": "101"}, "expand_m_out_of_range"),
        ({"expand_alpha": "-1"}, "expand_alpha_out_of_range"),
        ({"diversify": "1.5"}, "diversify_out_of_range"),
        ({"dedup": "-0.1"}, "dedup_out_of_range"),
        ({"dedup": "maybe"}, "invalid_parameter"),
        ({"min_score": "nan"}, "invalid_parameter"),
        ({"min_score": True}, "invalid_parameter"),
        ({"expand": "perhaps"}, "invalid_parameter"),
    ],
)
def test_bad_shaping_params_are_4xx_naming_the_problem(raw, error):
    with pytest.raises(ApiError) as e:
        validate_params(raw, Limits())
    assert e.value.status == 422 and e.value.error == error


def test_client_sends_the_options_as_the_app_reads_them():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(dict(request.url.params))
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json={"results": []})

    with SearchClient("http://app", transport=httpx.MockTransport(handler)) as client:
        client.search(id="x", k=3, expand=True, diversify=0.5, dedup=True, exclude_self=True)
    assert seen == {
        "k": "3",
        "expand": "true",
        "diversify": "0.5",
        "dedup": "true",
        "exclude_self": "true",
        "body": {"id": "x"},
    }
    raw = {k: v for k, v in seen.items() if k != "body"}
    opts = validate_params(raw, Limits()).shape
    assert opts.expand and opts.diversify == 0.5 and opts.exclude_self
    assert opts.dedup == shaping.DEDUP_THRESHOLD


def test_results_table_counts_collapsed_near_duplicates():
    body = {
        "results": [{"id": "a", "uri": "/a", "score": 0.9, "shard": 0, "collapsed": ["b", "c"]}],
        "took_ms": 1.0,
        "shards_answered": 1,
        "shards_total": 1,
    }
    assert format_results(body).splitlines()[1].split()[-1] == "+2"


# ---- the canary's arithmetic ---------------------------------------------------------------
def test_recall_window():
    assert recall_at_k(["a", "b", "x"], ["a", "b", "c"]) == pytest.approx(2 / 3)
    assert recall_at_k(["a"], []) is None
    window = RecallWindow(3)
    assert window.mean is None
    for value in (1.0, 1.0, 0.1, 0.4):
        window.add(value)
    assert len(window) == 3 and window.mean == pytest.approx(0.5)
