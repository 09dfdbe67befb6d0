"""Text -> image through the real Serve app (issue #25, part 2).

One app over a store of photos embedded by the embedding job with a tiny random open_clip model
(image and text towers; ``harness.tiny_models``) and indexed by the build job: the open_clip
kind's embed -> build -> serve -> search, with text queries, image + text mixes, filters on text
queries, the CLI's ``--text`` and the OpenAPI document's text forms. Random weights put texts
nowhere in particular, so what is checked is the path: the vector the app searches by is the
model's own text vector (the same top-k as an exact search by it), and mixing follows the
documented formula. The refusal for a model without a text tower (422 ``no_text_encoder``) is
in ``tests/test_serve_http.py``'s bad-input test.

The store is built with a learned transform (``--transform pca:8``, ``index.ann.transform``,
#25.5), so the same path shows a transformed store served: image and text queries arrive in the
model's space and the shards reduce them, an id's vector is already in the store's (the text is
brought there to mix with it), and every score is an inner product in the reduced space.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.model_runs import embed_and_build, query_vectors
from harness.serve_app import running_app
from harness.serve_store import caltech_sample
from harness.tiny_models import open_clip_tiny
from index.ann.transform import load_transform
from index.live.recall import exact_all
from index.query.shaping import EXPAND_ALPHA, EXPAND_M, expanded_query
from index.rows.sharding import uri_id
from index.storage.manifest import load_manifest
from index.storage.store import Store
from serve.deployments.query_model import mix
from visual_search.query_cli import search_main

pytestmark = pytest.mark.slow
REDUCED = 8  # the store's transform: PCA to 8 dimensions (24 photos: at least 2 x 8 rows)


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    model = open_clip_tiny(scratch_root / "tiny-clip")
    paths = caltech_sample(caltech_dir, classes=4, per_class=6)
    sidecar = scratch_root / "text-classes.csv"
    sidecar.write_text("uri,cls\n" + "".join(f"{p},{p.parent.name}\n" for p in paths))
    root = scratch_root / "text-store"
    built = embed_and_build(
        model, "none", paths, root, metadata=[str(sidecar)], transform=f"pca:{REDUCED}"
    )
    vectors = dict(zip(paths, query_vectors(built.embedder, paths), strict=True))
    with running_app(
        Store(root), paths, vectors, model=model, weights="none", shards_per_group=None
    ) as running:
        transform = load_transform(Store(root), load_manifest(Store(root)))
        running.extra.update(embedder=built.embedder, shards=built.shards, transform=transform)
        yield running


def reduced(app, vector: np.ndarray) -> np.ndarray:
    """A model-space vector in the store's space (a vector already there stays)."""
    transform = app.extra["transform"]
    if len(vector) == transform.out_dim:
        return np.asarray(vector, np.float32)
    return transform.apply(np.asarray(vector, np.float32)[None])[0]


def exact_top(app, vector: np.ndarray, k: int) -> list[str]:
    return exact_all(app.extra["shards"], reduced(app, vector)[None], k)[0]


def stored(app, row_id: str) -> np.ndarray:
    """A row's vector as the shards hold it (what an id query and the rerank use)."""
    found = (s.vector_of(row_id) for s in app.extra["shards"])
    return next(v for v in found if v is not None).astype(np.float32)


def ids(body: dict) -> list[str]:
    return [r["id"] for r in body["results"]]


def test_text_mixed_and_filtered_queries(app, capsys):
    embedder = app.extra["embedder"]
    text_vector = embedder.embed_text(["red shoes"])[0]
    with app.client() as client:
        body = client.post("/search", json={"text": "red shoes", "k": 5, "rerank": True}).json()
        assert ids(body) == exact_top(app, text_vector, 5)
        assert body["results"][0]["score"] == pytest.approx(
            float(stored(app, body["results"][0]["id"]) @ reduced(app, text_vector)), abs=1e-3
        )
        photo = app.paths[0]
        image_vector = app.vectors[photo]
        files = {"file": ("q.jpg", photo.read_bytes(), "image/jpeg")}
        mixed = client.post(
            "/search?k=5", files=files, data={"text": "red shoes", "text_weight": "0.3"}
        ).json()
        assert ids(mixed) == exact_top(app, mix(image_vector, text_vector, 0.3), 5)
        by_id = client.post(
            "/search", json={"id": uri_id(str(photo)), "text": "red shoes", "k": 5}
        ).json()
        row = uri_id(str(photo))
        assert stored(app, row).shape == (REDUCED,)  # an id's vector is in the store's space
        mixed_in_store = mix(stored(app, row), reduced(app, text_vector), 0.5)
        assert ids(by_id) == exact_top(app, mixed_in_store, 5)
        # shaping reads rows back (in the store's space) beside the reduced query
        for shaping in ("expand=true", "dedup=0.95", "diversify=0.5"):
            shaped = client.post(f"/search?k=5&{shaping}", json={"text": "red shoes"})
            assert shaped.status_code == 200 and len(ids(shaped.json())) == 5, shaping
        expanded = client.post("/search?k=5&expand=true", json={"id": row}).json()
        top = client.post(f"/search?k={EXPAND_M}", json={"id": row}).json()["results"]
        neighbours = np.stack([stored(app, r["id"]) for r in top])
        query = expanded_query(
            stored(app, row), neighbours, [r["score"] for r in top], EXPAND_ALPHA
        )
        assert ids(expanded) == exact_top(app, query, 5)  # expanded in the store's space
        wanted = app.paths[-1].parent.name
        only = client.post(
            "/search",
            json={
                "text": "red shoes",
                "k": 3,
                "filter": {"field": "cls", "eq": wanted},
                "fields": ["cls"],
            },
        ).json()
        assert len(only["results"]) == 3
        assert {r["metadata"]["cls"] for r in only["results"]} == {wanted}
        for bad, code in (
            ({"text": ""}, "invalid_text"),
            ({"text": 3}, "invalid_text"),
            ({"text": "a", "text_weight": 2}, "invalid_parameter"),
            ({"id": "x", "text_weight": 0.5}, "invalid_parameter"),
        ):
            answer = client.post("/search", json=bad)
            assert (answer.status_code, answer.json()["error"]) == (422, code), bad
        doc = client.get("/openapi.json").json()
        forms = doc["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]
        assert ["text"] in [form["required"] for form in forms["schema"]["oneOf"]]
        stats = client.get("/stats").json()
        assert stats["embedder"]["text"] is True and stats["model"].startswith("open_clip:")
    assert search_main(["--url", app.base_url, "--text", "red shoes", "--k", "5", "--json"]) == 0
    assert ids(json.loads(capsys.readouterr().out)) == exact_top(app, text_vector, 5)
