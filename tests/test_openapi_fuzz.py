"""The OpenAPI document is one a generated client can trust, checked against the running app.

One app like the demo's (no API key, open writes on loopback, thumbnails under the photos'
folder), over 8 real Caltech-101 photos in 2 shards with typed metadata columns:

- schemathesis runs with every check and every phase (examples, coverage, fuzzing, stateful:
  requests the document allows must be accepted, those it forbids refused with a documented
  4xx JSON error, 405s with an ``Allow`` header, created rows readable, ...), seeded and bounded;
  it must find nothing;
- openapi-python-client generates a typed client from the same document (into tmp_path), and one
  search by vector and one by image go through it.
"""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from harness.openapi_fuzz import run_schemathesis
from harness.serve_app import running_app
from harness.serve_store import caltech_sample, write_caltech_store

pytestmark = pytest.mark.slow

NUM_SHARDS = 2
SEED = 1
MAX_EXAMPLES = 8
# openapi-python-client's config (docs/api.md): no post hooks (by default it runs ruff over what it
# wrote), and the thumbnail's JPEG read as bytes (it knows no image/* content)
CLIENT_CONFIG = """\
package_name_override: vs_api_client
project_name_override: vs-api-client
post_hooks: []
content_type_overrides:
  image/jpeg: application/octet-stream
"""


@pytest.fixture(scope="module")
def app(ray_local, scratch_root, caltech_dir):
    photos = caltech_sample(caltech_dir, classes=2, per_class=4)
    metadata = pa.table(
        {
            "category": [p.parent.name for p in photos],
            "price": [5.0 + 10 * i for i in range(len(photos))],
            "in_stock": [i % 2 == 0 for i in range(len(photos))],
            "stock": pa.array(list(range(len(photos))), pa.int64()),
        }
    )
    root = scratch_root / "openapi-fuzz"
    store, by_uri = write_caltech_store(root, photos, NUM_SHARDS, metadata=metadata)
    # the demo's settings: no key, writes open on loopback, thumbnails of the catalogue's photos
    overrides = {"api_key": "", "open_writes": True, "thumbnail_roots": [str(caltech_dir)]}
    with running_app(store, photos, by_uri, **overrides) as running:
        yield running


def test_schemathesis_with_every_check_and_phase_finds_nothing(app, tmp_path):
    run = run_schemathesis(app.base_url, tmp_path, seed=SEED, max_examples=MAX_EXAMPLES)
    print(run.summary())
    assert run.tests > 0, run.output[-4000:]
    assert (run.returncode, run.failures, run.errors) == (0, 0, 0), (
        f"{run.summary()}\n{run.failures_text()}"
    )


def test_a_generated_client_searches_with_typed_answers(app, tmp_path):
    with app.client(keyed=False) as client:
        (tmp_path / "openapi.json").write_text(client.get("/openapi.json").text)
    (tmp_path / "config.yaml").write_text(CLIENT_CONFIG)
    generator = Path(sys.executable).with_name("openapi-python-client")
    done = subprocess.run(
        [
            str(generator),
            "generate",
            "--path",
            "openapi.json",
            "--config",
            "config.yaml",
            "--meta",
            "none",
            "--output-path",
            "vs_api_client",
            "--fail-on-warning",  # every operation and schema made it into the client
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        api = importlib.import_module("vs_api_client")
        search = importlib.import_module("vs_api_client.api.default.search_search_post")
        models = importlib.import_module("vs_api_client.models")
        types = importlib.import_module("vs_api_client.types")
        uri, vector = next(iter(app.vectors.items()))
        with api.Client(base_url=app.base_url, timeout=60) as client:
            by_vector = models.SearchSearchPostJsonBodyType0(vector=vector.tolist(), k=3)
            answer = search.sync(client=client, body=by_vector)
            assert isinstance(answer, models.SearchResponse), answer
            assert len(answer.results) == 3 and answer.shards_answered == NUM_SHARDS
            top = answer.results[0]
            assert isinstance(top, models.Result) and isinstance(top.score, float)
            assert top.uri == uri and isinstance(top.metadata, models.Metadata)
            assert isinstance(top.metadata.price, float) and isinstance(top.metadata.stock, int)
            photo = app.paths[0].read_bytes()
            upload = models.SearchSearchPostFilesBody(
                file=types.File(io.BytesIO(photo), file_name="q.jpg", mime_type="image/jpeg"),
                k=2,
            )
            answer = search.sync(client=client, body=upload)
            assert isinstance(answer, models.SearchResponse), answer
            assert answer.results[0].uri == app.paths[0].resolve().as_uri()
            # a refusal comes back typed too: the documented error body
            bad = models.SearchSearchPostFilesBody(
                file=types.File(payload=io.BytesIO(b"not an image"), file_name="x.jpg"), k=2
            )
            refused = search.sync_detailed(client=client, body=bad)
            assert refused.status_code == 415
            assert isinstance(refused.parsed, models.ErrorResponse)
            assert refused.parsed.error == "not_an_image"
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "vs_api_client"]:
            del sys.modules[name]
