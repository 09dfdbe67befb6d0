"""Text -> image through the real Serve app (issue #25, part 2), and the no-text-tower refusal.

One app over a store of real photos embedded by a tiny random open_clip model (image and text
towers; ``harness.tiny_models``): text queries, image + text mixes, filters on text queries, the
CLI's ``--text``, the OpenAPI document's text forms. Random weights put texts nowhere in
particular, so what is checked is the path: the vector the app searches by is the model's own
text vector (the same top-k as an in-process search by it), and mixing follows the documented
formula.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedding.config import ModelConfig
from embedding.model import Embedder
from harness.serve_app import running_app
from harness.serve_store import caltech_sample, write_caltech_store
from harness.tiny_models import open_clip_tiny
from index.rows.sharding import uri_id
from serve.deployments.query_model import mix
from visual_search.query_cli import search_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    model = ModelConfig(name=open_clip_tiny(scratch_root / "tiny-clip"), weights="none", threads=1)
    paths = caltech_sample(caltech_dir, classes=4, per_class=6)
    classes = pa.table({"cls": [p.parent.name for p in paths]})
    store, vectors = write_caltech_store(
        scratch_root / "text-store", paths, 2, model=model, metadata=classes
    )
    with running_app(
        store, paths, vectors, model=model.name, weights="none", shards_per_group=None
    ) as running:
        running.extra["embedder"] = Embedder(model)
        yield running


def exact_top(app, vector: np.ndarray, k: int) -> list[str]:
    uris = list(app.vectors)
    scores = np.stack([app.vectors[u] for u in uris]) @ vector
    return [uri_id(uris[i]) for i in np.argsort(-scores)[:k]]


def ids(body: dict) -> list[str]:
    return [r["id"] for r in body["results"]]


def test_text_mixed_and_filtered_queries(app, capsys):
    embedder = app.extra["embedder"]
    text_vector = embedder.embed_text(["red shoes"])[0]
    with app.client() as client:
        body = client.post("/search", json={"text": "red shoes", "k": 5, "rerank": True}).json()
        assert ids(body) == exact_top(app, text_vector, 5)
        assert body["results"][0]["score"] == pytest.approx(
            float(app.vectors[body["results"][0]["uri"]] @ text_vector), abs=1e-3
        )
        photo = app.paths[0]
        image_vector = app.vectors[photo.resolve().as_uri()]
        files = {"file": ("q.jpg", photo.read_bytes(), "image/jpeg")}
        mixed = client.post(
            "/search?k=5", files=files, data={"text": "red shoes", "text_weight": "0.3"}
        ).json()
        assert ids(mixed) == exact_top(app, mix(image_vector, text_vector, 0.3), 5)
        by_id = client.post(
            "/search", json={"id": uri_id(photo.resolve().as_uri()), "text": "red shoes", "k": 5}
        ).json()
        assert ids(by_id) == exact_top(app, mix(image_vector, text_vector, 0.5), 5)
        wanted = app.paths[-1].parent.name
        only = client.post(
            "/search",
            json={"text": "red shoes", "k": 3, "filter": {"cls": wanted}, "fields": ["cls"]},
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
    import json

    assert ids(json.loads(capsys.readouterr().out)) == exact_top(app, text_vector, 5)
