"""The routed layout's router (``index.ann.routing``): trained cells grouped into balanced,
local shards, a probe order per query, the default probe measured by the written rule, and the
file the store keeps (named by its digest, refused when its bytes do not match)."""

from __future__ import annotations

import numpy as np
import pytest

from harness.stores import write_store
from harness.synthetic import gaussian_mixture
from index.ann.routing import (
    TARGET_COVERAGE,
    Router,
    RoutingError,
    default_probe_for,
    load_router,
    probe_coverage,
    route_region_rows,
    save_router,
    train_router,
)
from index.rows.regions import region_id
from index.storage.manifest import Manifest, load_manifest

DIM = 32
SHARDS = 8


@pytest.fixture(scope="module")
def trained():
    x = gaussian_mixture(12_000, DIM, clusters=200, seed=5)
    return x, train_router(x[:8000], SHARDS, "ip", cells_per_shard=4)


def test_rows_spread_over_every_shard_near_evenly(trained):
    x, router = trained
    sizes = np.bincount(router.shards_of(x), minlength=SHARDS)
    assert sizes.min() > 0 and sizes.max() <= 1.6 * sizes.mean(), sizes
    assert sorted(set(router.cell_shard.tolist())) == list(range(SHARDS))


def test_a_query_visits_the_shards_of_its_nearest_cells_first(trained):
    x, router = trained
    q = x[9000]
    order = router.probe(q, SHARDS)
    assert sorted(order) == list(range(SHARDS)) and len(set(order)) == SHARDS
    assert order[0] == router.shards_of(q)[0]  # its own cell's shard first
    assert router.probe(q, 3) == order[:3]
    assert len(router.probe(q)) == router.default_probe
    with pytest.raises(RoutingError):
        router.probe(q, SHARDS + 1)


def test_the_default_probe_is_the_fewest_shards_reaching_the_target_coverage(trained):
    x, router = trained
    coverage = probe_coverage(router, x[10_000:10_200], x[:10_000])
    assert all(a <= b + 1e-12 for a, b in zip(coverage, coverage[1:], strict=False))
    assert coverage[-1] == pytest.approx(1.0)  # every shard: nothing lost to routing
    assert router.coverage and router.coverage[router.default_probe - 1] >= TARGET_COVERAGE
    assert router.default_probe == 1 or router.coverage[router.default_probe - 2] < TARGET_COVERAGE
    assert default_probe_for([0.5, 0.9, 0.97, 1.0]) == 3
    assert default_probe_for([0.5, 0.9]) == 2  # none reaches it: every shard


def test_region_rows_follow_their_image_row():
    ids = ["a", region_id("a", 2, 0, 1), "b", region_id("b", 2, 1, 1), region_id("c", 2, 0, 0)]
    shards = route_region_rows(ids, np.array([3, 1, 5, 0, 2]))
    assert shards.tolist() == [3, 3, 5, 5, 2]  # c's image row is not in the batch: its own


def test_the_router_file_round_trips_and_a_changed_file_is_refused(trained, tmp_path):
    x, router = trained
    again = Router.from_bytes(router.to_bytes())
    assert again.digest == router.digest and np.array_equal(again.cell_shard, router.cell_shard)
    assert again.default_probe == router.default_probe and again.coverage == router.coverage
    ids = [f"r{i}" for i in range(2000)]
    store = write_store(tmp_path / "s", ids, ids, x[:2000], SHARDS, router=router)
    manifest = load_manifest(store)
    assert manifest.layout == "routed" and manifest.router == save_router(store, router)
    assert load_router(store, manifest).digest == router.digest
    assert (tmp_path / "s" / manifest.router).is_file()  # in the store, beside its manifests
    for shard in range(SHARDS):  # each row sits in its vector's shard
        for part in store.list_parts(shard):
            table = store.read_parquet([store.path(part)])
            rows = [ids.index(i) for i in table["id"].to_pylist()]
            assert set(router.shards_of(x[rows]).tolist()) <= {shard}
    other = train_router(x[:4000], SHARDS, "ip", cells_per_shard=2, seed=9)
    manifest.router = f"_routing/router-{other.digest}.npz"  # a file whose bytes are not it
    store.write_bytes(store.path(manifest.router), router.to_bytes())
    with pytest.raises(RoutingError, match="promises"):
        load_router(store, manifest)


def test_a_manifest_names_its_layout_and_a_routed_one_its_router():
    m = Manifest("m", "w", 8, 2, layout="routed", router="_routing/router-00.npz")
    assert Manifest.from_json(m.to_json()).router == "_routing/router-00.npz"
    assert Manifest.from_json(Manifest("m", "w", 8, 2).to_json()).layout == "hash"
    with pytest.raises(ValueError, match="router"):
        Manifest("m", "w", 8, 2, layout="routed")
    with pytest.raises(ValueError, match="layout"):
        Manifest("m", "w", 8, 2, layout="ring")


def test_too_small_a_sample_is_refused_with_what_it_needs():
    with pytest.raises(RoutingError, match="need at least"):
        train_router(np.ones((50, 4), np.float32), 4)


def test_probe_ranks_shards_by_their_nearest_cell_as_an_exact_search_of_the_cells(trained):
    from index.ann.exact import exact_search

    x, router = trained
    for q in x[::997][:20]:
        cells = exact_search(q, router.centroids, len(router.centroids), router.metric)[1][0]
        first: list[int] = []
        for shard in router.cell_shard[cells].tolist():
            if shard not in first:
                first.append(shard)
        assert router.probe(q, SHARDS) == first
