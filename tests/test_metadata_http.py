"""Metadata and filtered search over real HTTP: Caltech-shaped photos embedded by the real batch job
with a sidecar table (the class as ``category``, a deterministic ``price`` and ``in_stock``),
indexed, served by the real Serve graph, and searched with filters.

One module-wide app (two shards, the real image model); the tests only add rows, never delete.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from harness.polling import wait_for
from harness.serve_app import running_app
from harness.serve_store import caltech_sample
from index.live.rebuild import rebuild_shard
from index.rows import schema
from index.storage.manifest import ManifestMismatch, evolve_metadata, load_manifest
from index.storage.store import Store
from pipelines.embed import run_job
from pipelines.embed_config import EmbedJobConfig

pytestmark = pytest.mark.slow

NUM_SHARDS = 2
KEY = "metadata-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BOTH_KEYS = {**AUTH, "X-API-Key": KEY}
COLUMNS = {"category": "string", "price": "float", "in_stock": "bool"}


def price_of(i: int) -> float:
    return round(5 + (i * 37) % 200 + 0.99, 2)


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    photos = caltech_sample(caltech_dir, classes=6, per_class=10)
    work = scratch_root / "metadata-http"
    work.mkdir()
    listing = work / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    sidecar = work / "catalogue.csv"
    lines = ["uri,category,price,in_stock"]
    for i, p in enumerate(photos):
        lines.append(f"{p},{p.parent.name},{price_of(i)},{'true' if i % 3 else 'false'}")
    sidecar.write_text("\n".join(lines) + "\n")
    root = work / "store"
    config = EmbedJobConfig(
        input=[str(listing)],
        store=str(root),
        num_shards=NUM_SHARDS,
        batch_size=16,
        actors=2,
        metadata=[str(sidecar)],
    )
    summary = run_job(config)
    assert summary.embedded == len(photos) and summary.errors == 0, summary.line()
    assert summary.metadata_matched == len(photos) and summary.metadata_missing == 0
    store = Store(root)
    assert load_manifest(store).metadata == COLUMNS
    for shard in range(NUM_SHARDS):
        rebuild_shard(store, shard)
    catalogue = read_catalogue(store)
    with running_app(store, photos, {}, api_key=KEY, shard_deadline_ms=3000) as running:
        with running.client(60) as client:
            yield SimpleNamespace(
                client=client,
                store=store,
                photos=photos,
                catalogue=catalogue,
                sidecar=sidecar,
                listing=listing,
                url=running.base_url,
            )


def read_catalogue(store: Store) -> dict:
    """Every stored row: id -> {uri, vector (as the index holds it: float16), metadata}."""
    rows = {}
    for shard in range(NUM_SHARDS):
        for rel in store.list_parts(shard):
            table = pq.read_table(store.path(rel))
            vectors = schema.arrow_to_vectors(table[schema.EMBEDDING])
            for i, row in enumerate(table.select(["id", "uri", *COLUMNS]).to_pylist()):
                rows[row["id"]] = {
                    "uri": row["uri"],
                    "vector": vectors[i].astype(np.float16).astype(np.float32),
                    "metadata": {c: row[c] for c in COLUMNS},
                }
    return rows


def exact(app, query: np.ndarray, keep, k: int) -> list[str]:
    """Ids of the ``k`` best rows that ``keep(metadata)`` accepts, by exact inner product."""
    scored = [
        (-float(row["vector"] @ query), row_id)
        for row_id, row in app.catalogue.items()
        if keep(row["metadata"])
    ]
    return [row_id for _, row_id in sorted(scored)[:k]]


def search(app, **kwargs) -> httpx.Response:
    return app.client.post("/search", **kwargs)


def test_sidecar_columns_are_stored_typed_and_returned_with_results(app):
    first_id = next(iter(app.catalogue))
    query = app.catalogue[first_id]["vector"]
    r = search(app, json={"vector": query.tolist(), "k": 5})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["id"] == first_id
    for hit in results:  # default: every column, typed as the store's schema
        assert hit["metadata"] == app.catalogue[hit["id"]]["metadata"]
        assert isinstance(hit["metadata"]["price"], float)
        assert isinstance(hit["metadata"]["in_stock"], bool)
    photo = app.photos[7]
    # fields: from the query string, the JSON body, or a form; [] / "" for none
    r = search(app, params={"fields": "price"}, json={"vector": query.tolist(), "k": 3})
    assert [set(h["metadata"]) for h in r.json()["results"]] == [{"price"}] * 3
    r = search(app, json={"vector": query.tolist(), "k": 3, "fields": []})
    assert [h["metadata"] for h in r.json()["results"]] == [{}] * 3
    files = {"file": ("q.jpg", photo.read_bytes(), "image/jpeg")}
    r = search(app, files=files, data={"k": "2", "fields": "category,in_stock"})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["uri"] == str(photo) and set(top["metadata"]) == {"category", "in_stock"}


def filters(c: list[str]) -> list[tuple[dict, object]]:
    """Filters over the six classes ``c`` (sorted; Caltech's: Faces, Faces_easy, Leopards,
    Motorbikes, accordion, airplanes) and the price and stock columns, with what each keeps."""
    return [
        ({"field": "category", "eq": c[4]}, lambda m: m["category"] == c[4]),
        (
            {"field": "category", "in": [c[5], c[2]]},
            lambda m: m["category"] in (c[5], c[2]),
        ),
        ({"field": "price", "range": {"gte": 50, "lt": 120}}, lambda m: 50 <= m["price"] < 120),
        (
            {
                "and": [
                    {"field": "in_stock", "eq": True},
                    {"field": "price", "range": {"lt": 100}},
                    {"not": {"field": "category", "eq": c[0]}},
                ]
            },
            lambda m: m["in_stock"] and m["price"] < 100 and m["category"] != c[0],
        ),
        (
            {
                "or": [
                    {"field": "category", "eq": c[3]},
                    {"field": "price", "range": {"gt": 190}},
                ]
            },
            lambda m: m["category"] == c[3] or m["price"] > 190,
        ),
        ({"field": "category", "eq": "no such class"}, lambda m: False),
    ]


def test_filtered_queries_return_only_matching_rows_in_exact_order(app):
    categories = sorted({row["metadata"]["category"] for row in app.catalogue.values()})
    assert categories == sorted({p.parent.name for p in app.photos}) and len(categories) == 6
    queries = [app.catalogue[i]["vector"] for i in list(app.catalogue)[::13]]
    for body, keep in filters(categories):
        for query in queries:
            r = search(app, json={"vector": query.tolist(), "k": 8, "filter": body})
            assert r.status_code == 200, (body, r.text)
            results = r.json()["results"]
            assert [h["id"] for h in results] == exact(app, query, keep, 8), body
            for hit in results:
                assert (
                    keep(hit["metadata"])
                    and hit["metadata"] == (app.catalogue[hit["id"]]["metadata"])
                )
            scores = [h["score"] for h in results]
            assert scores == sorted(scores, reverse=True)
    # an image query with the filter as JSON text in the form; and an id query with a filter
    photo = app.photos[43]  # of the 5th class, so the filter for another must not return it
    assert photo.parent.name == categories[4]
    files = {"file": ("q.jpg", photo.read_bytes(), "image/jpeg")}
    leopards = categories[2]  # on Caltech-101; any other class elsewhere
    other = {"field": "category", "eq": leopards}
    r = search(app, files=files, data={"k": "4", "filter": json.dumps(other)})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert len(got) == 4 and all(h["metadata"]["category"] == leopards for h in got)
    same = {"field": "category", "eq": photo.parent.name}
    r = search(app, files=files, data={"k": "1", "filter": json.dumps(same)})
    assert r.json()["results"][0]["uri"] == str(photo)
    # answer shaping searches again (query expansion, a larger pool for dedup): with the filter
    for shaping in ({"expand": True}, {"dedup": True, "diversify": True}):
        body = {"vector": queries[0].tolist(), "k": 5, "filter": other, **shaping}
        r = search(app, json=body)
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert got and all(h["metadata"]["category"] == leopards for h in got), shaping
    row_id = next(i for i, row in app.catalogue.items() if row["uri"] == str(photo))
    r = search(app, json={"id": row_id, "k": 5, "filter": other})
    assert [h["id"] for h in r.json()["results"]] == exact(
        app, app.catalogue[row_id]["vector"], lambda m: m["category"] == leopards, 5
    )


@pytest.mark.parametrize(
    "body, status, error",
    [
        ({"filter": {"field": "colour", "eq": "red"}}, 422, "unknown_field"),
        ({"filter": {"field": "price", "eq": "cheap"}}, 422, "wrong_type"),
        ({"filter": {"field": "category", "range": {"lt": 3}}}, 422, "wrong_type"),
        ({"filter": {"field": "in_stock", "eq": 1}}, 422, "wrong_type"),
        ({"filter": {"field": "price", "range": {}}}, 422, "invalid_filter"),
        ({"filter": {"and": []}}, 422, "invalid_filter"),
        ({"filter": {"field": "price", "eq": 1, "in": [1]}}, 422, "invalid_filter"),
        ({"filter": [{"field": "price", "eq": 1}]}, 422, "invalid_filter"),
        ({"filter": "price < 50"}, 422, "invalid_filter"),
        ({"fields": ["price", "colour"]}, 422, "unknown_field"),
        ({"fields": "price,"}, 200, None),
        ({"fields": 7}, 422, "invalid_fields"),
    ],
)
def test_bad_filters_and_fields_are_422_naming_the_problem(app, body, status, error):
    query = next(iter(app.catalogue.values()))["vector"].tolist()
    r = search(app, json={"vector": query, "k": 3, **body})
    assert r.status_code == status, r.text
    if error:
        answer = r.json()
        assert answer["error"] == error and answer["detail"], answer
        if "filter" in body and isinstance(body["filter"], dict) and error != "invalid_filter":
            assert "filter" in answer["detail"]  # where in the filter, and which column
    files = {"file": ("q.jpg", app.photos[0].read_bytes(), "image/jpeg")}
    r = search(app, files=files, data={"filter": "{not json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_filter"


def test_added_rows_are_checked_against_the_schema_and_filterable_at_once(app):
    photo = app.photos[12]
    files = {"file": ("new.jpg", photo.read_bytes(), "image/jpeg")}
    metadata = {"category": "new-arrivals", "price": 42, "in_stock": True}
    r = app.client.post(
        "/images",
        headers=AUTH,
        files=files,
        data={"uri": "s3://shop/new.jpg", "metadata": json.dumps(metadata)},
    )
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["metadata"] == {"category": "new-arrivals", "price": 42.0, "in_stock": True}
    flt = {"field": "category", "eq": "new-arrivals"}
    r = search(
        app,
        files={"file": ("q.jpg", photo.read_bytes(), "image/jpeg")},
        data={"filter": json.dumps(flt)},
    )
    hits = r.json()["results"]
    assert [h["id"] for h in hits] == [added["id"]] and hits[0]["metadata"]["price"] == 42.0
    vector = app.catalogue[next(iter(app.catalogue))]["vector"].tolist()
    r = app.client.post(
        "/images", headers=AUTH, json={"vector": vector, "id": "json-row", "metadata": {}}
    )
    assert r.status_code == 201 and r.json()["metadata"] == {}
    r = search(app, json={"id": "json-row", "k": 1, "filter": {"field": "price", "exists": False}})
    assert [h["id"] for h in r.json()["results"]] == ["json-row"]
    assert r.json()["results"][0]["metadata"] == {"category": None, "price": None, "in_stock": None}
    for bad, words in [
        ({"colour": "red"}, "unknown metadata fields ['colour']"),
        ({"price": "cheap"}, "'price' is a float column"),
        ({"in_stock": "yes"}, "'in_stock' is a bool column"),
        ([1, 2], "must be a JSON object"),
    ]:
        r = app.client.post("/images", headers=AUTH, json={"vector": vector, "metadata": bad})
        assert r.status_code == 422 and r.json()["error"] == "invalid_metadata", r.text
        assert words in r.json()["detail"]
    # a column another writer added since this app started: the ingress re-reads the schema
    # (at most once a second, so a burst of requests naming unknown columns costs one read)
    evolve_metadata(app.store, {"brand": "string"})
    body = {"vector": vector, "id": "branded", "metadata": {"brand": "acme", "price": 3}}

    def add_branded():
        r = app.client.post("/images", headers=AUTH, json=body)
        return None if r.status_code == 422 else r

    r = wait_for(add_branded, 10, "the new column accepted")
    assert r.status_code == 201, r.text
    r = search(app, json={"id": "branded", "k": 3, "filter": {"field": "brand", "eq": "acme"}})
    assert r.status_code == 200 and [h["id"] for h in r.json()["results"]] == ["branded"]
    assert r.json()["results"][0]["metadata"]["brand"] == "acme"


def test_the_record_route_returns_the_rows_metadata(app):
    row_id, row = next(iter(app.catalogue.items()))
    r = app.client.get(f"/images/{row_id}")
    assert r.status_code == 200, r.text
    assert r.json()["metadata"] == row["metadata"] and r.json()["uri"] == row["uri"]
    r = app.client.get(f"/images/{row_id}", params={"fields": "price"})
    assert r.json()["metadata"] == {"price": row["metadata"]["price"]}
    assert app.client.get(f"/images/{row_id}", params={"fields": ""}).json()["metadata"] == {}
    r = app.client.get(f"/images/{row_id}", params={"fields": "colour"})
    assert r.status_code == 422 and r.json()["error"] == "unknown_field"
    assert app.client.get("/images/no-such-row").json()["error"] == "unknown_id"


def test_a_later_run_with_another_type_is_refused_before_it_writes(app, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"uri,price\n{app.photos[0]},expensive\n")
    parts = {s: app.store.list_parts(s) for s in range(NUM_SHARDS)}
    config = EmbedJobConfig(input=[str(app.listing)], store=app.store.uri, metadata=[str(bad)])
    with pytest.raises(ManifestMismatch, match="'price' is float in this store but string"):
        run_job(config)
    assert {s: app.store.list_parts(s) for s in range(NUM_SHARDS)} == parts
    assert load_manifest(app.store).metadata["price"] == "float"


def test_openapi_is_exact_for_the_store_and_requests_generated_from_it_are_accepted(app):
    """schemathesis generates requests for ``POST /search`` and ``POST /images`` from the app's
    own document (JSON and multipart bodies, filters from the per-column schema, query
    parameters in their ranges) and checks each answer: never refused as malformed (400/415/
    422), never a 5xx, only documented statuses, bodies as documented."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        positive_data_acceptance,
        response_schema_conformance,
        status_code_conformance,
    )

    doc = app.client.get("/openapi.json").json()
    search = doc["paths"]["/search"]["post"]
    by_vector = search["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]
    assert by_vector["properties"]["vector"]["minItems"] == 1280
    assert set(COLUMNS) <= set(doc["components"]["schemas"]["Metadata"]["properties"])
    branches = doc["components"]["schemas"]["FilterCondition"]["oneOf"]
    conditions = [c["properties"] for c in branches]
    ranges = {c["field"]["const"] for c in conditions if "range" in c}
    assert ranges == {"price"}  # ranges are offered on numeric columns only
    photos = [p.read_bytes() for p in app.photos[:5]]
    schemathesis.openapi.media_type("image/jpeg", st.sampled_from(photos))
    schema = schemathesis.openapi.from_dict(doc)
    checks = [
        not_a_server_error,
        positive_data_acceptance,
        status_code_conformance,
        response_schema_conformance,
        content_type_conformance,
    ]
    seen: dict[str, set] = {}

    def fuzz(path: str):
        @settings(
            max_examples=20,  # test_openapi_fuzz.py fuzzes every operation with every check
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=schema[path]["POST"].as_strategy())
        def run(case):
            # the key in both places the document names, over any the generator made up
            response = case.call(base_url=app.url, headers=BOTH_KEYS, timeout=60)
            seen.setdefault(path, set()).add((case.media_type, response.status_code))
            case.validate_response(response, checks=checks)

        run()

    fuzz("/search")
    fuzz("/images")
    # both bodies of both operations were sent and accepted
    for path in ("/search", "/images"):
        kinds = {media for media, _ in seen[path]}
        assert kinds == {"application/json", "multipart/form-data"}, seen[path]
        assert {status for _, status in seen[path]} <= {200, 201, 404}, seen[path]
