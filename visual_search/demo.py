"""The demo, end to end on one machine: images -> embeddings -> shard indexes -> Serve -> a query.

    bash scripts/demo.sh                        # the built-in photo set (scikit-image's samples)
    bash scripts/demo.sh --images DIR_OR_URI    # any folder, glob, list file or fsspec URI

Steps: write the default image set (real photos shipped inside scikit-image plus deterministic
edits of each, so every query has true matches) unless ``--images`` is given; start a local Ray
bound to 127.0.0.1; run the Ray Data embedding job into a sharded store; build every shard's
index; start Serve on 127.0.0.1:PORT (thumbnails read under the images' folders only:
``thumbnail_roots``); run a sample query and print its results and a ready ``curl`` line;
keep serving until Ctrl-C (``--exit``: stop after the sample query, for CI).
Every step is idempotent: a second run re-embeds and rebuilds nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.local_ray import use_local_ray_env
from serve.local import DEFAULT_MODE, SERVE_MODES
from visual_search.serving import run_app, serve_forever, shutdown, start_ray, stop_on_sigterm

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = ROOT / "demo-store"

use_local_ray_env()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", help="images to index (default: the built-in photo set)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="demo folder")
    p.add_argument("--store", help="store root URI (default: WORKDIR/store)")
    p.add_argument("--num-shards", type=int, default=2, help="shards of a new store (default 2)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--query", help="image file for the sample query (default: a held-out edit)")
    p.add_argument("--k", type=int, default=5, help="results of the sample query (default 5)")
    p.add_argument(
        "--num-cpus", type=int, help="logical CPUs of the local Ray (default max(4, cores))"
    )
    p.add_argument("--ray-temp-dir", help="temp dir of the local Ray (keep the path short)")
    p.add_argument(
        "--serve-mode",
        choices=tuple(SERVE_MODES),
        default=DEFAULT_MODE,
        help="haproxy (default): Serve's throughput mode behind its HAProxy ingress; throughput: "
        "the same behind Serve's Python proxy; default: Serve as installed (serve/local.py)",
    )
    p.add_argument(
        "--exit",
        "--no-serve-forever",
        dest="exit",
        action="store_true",
        help="stop after the sample query instead of serving until Ctrl-C",
    )
    args = p.parse_args(argv)
    if args.num_shards < 1:
        p.error("--num-shards must be >= 1")
    if not 1 <= args.k <= 1000:
        p.error("--k must be in 1..1000")
    return args


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def embed(images: str, store: str, num_shards: int) -> None:
    from pipelines.embed import run_job
    from pipelines.embed_config import EmbedJobConfig

    summary = run_job(EmbedJobConfig(input=[images], store=store, num_shards=num_shards))
    print(summary.line(), flush=True)
    if summary.errors:
        print(f"  ({summary.errors} inputs could not be embedded: see {store}/errors/)")


def build_indexes(store_uri: str) -> None:
    """The index build job (one Ray task per out-of-date shard; each commit makes it live)."""
    from pipelines.build_index import BuildConfig, run

    summary = run(BuildConfig(store=store_uri, num_cpus=0.5, progress=False))
    print(summary.line(), flush=True)
    if summary.failed:
        raise SystemExit(f"demo: index build failed for shards {summary.failed}")


def thumbnail_roots_of(images: str) -> list[str]:
    """The ``thumbnail_roots`` that cover the demo's catalogue: the ``--images`` folder itself,
    else the folders (object-store prefixes) of its inputs. The app reads thumbnails only under
    its roots (``serve.http.thumbnails``); web URLs are never read, so they get none."""
    from serve.config import ConfigError, thumbnail_root

    if "://" not in images and Path(images).is_dir():
        return [str(Path(images).resolve())]
    roots: set[str] = set()
    for uri in _inputs(images):
        parent = uri.rsplit("/", 1)[0] if "://" in uri else str(Path(uri).resolve().parent)
        try:
            roots.add(thumbnail_root(parent))
        except ConfigError:  # http(s) inputs, files in / itself: no thumbnails for those
            pass
    return sorted(roots)


def start_serve(store: str, host: str, port: int, thumbnail_roots: list[str] | None = None):
    from serve.app import build_app
    from serve.config import ServeConfig

    config = ServeConfig(store=store, thumbnail_roots=list(thumbnail_roots or []))
    # writes need a key (serve.http.security); a demo on loopback with no key opens them, and
    # says so
    config.open_writes = not config.api_key and host in ("127.0.0.1", "localhost", "::1")
    if config.open_writes:
        print(
            f"writes (POST /images, DELETE /images/{{id}}, /admin) are open to anyone on {host} "
            "(open_writes); set VISUAL_SEARCH_API_KEY to require a key"
        )
    elif not config.api_key:
        print(
            f"writes are closed: Serve listens on {host}; set VISUAL_SEARCH_API_KEY to allow them"
        )
    run_app(build_app(config), config, host, port)
    return config


def sample_query(base_url: str, query: Path | str, k: int, label_of=None) -> dict:
    import httpx

    data = Path(query).read_bytes() if Path(query).exists() else _read_uri(str(query))
    r = httpx.post(
        f"{base_url}/search",
        params={"k": k},
        files={"file": (Path(str(query)).name, data, "application/octet-stream")},
        timeout=60,
    )
    r.raise_for_status()
    body = r.json()
    want = label_of(str(query)) if label_of else None
    print(f"query: {query}")
    print(f"{'rank':>4}  {'score':>6}  {'shard':>5}  uri")
    for rank, hit in enumerate(body["results"], 1):
        mark = ""
        if want is not None:
            mark = "  [same photo]" if label_of(hit["uri"]) == want else "  [other]"
        print(f"{rank:>4}  {hit['score']:6.3f}  {hit['shard']:>5}  {hit['uri']}{mark}")
    print(f"took {body['took_ms']:.1f} ms, {body['shards_answered']}/{body['shards_total']} shards")
    return body


def held_out_precision(base_url: str, queries: list[Path], k: int) -> float:
    """Mean fraction of the top-k from the query's own source photo, over held-out edits."""
    import httpx

    from visual_search.demo_images import group_of

    hits = 0
    with httpx.Client(timeout=60) as client:
        for q in queries:
            r = client.post(
                f"{base_url}/search",
                params={"k": k},
                files={"file": (q.name, q.read_bytes(), "image/jpeg")},
            )
            r.raise_for_status()
            hits += sum(group_of(h["uri"]) == group_of(str(q)) for h in r.json()["results"])
    return hits / (k * len(queries))


def _read_uri(uri: str) -> bytes:
    from pipelines.uris import read_uri

    return read_uri(uri, 64 * 1024 * 1024)


def _inputs(images: str) -> list[str]:
    from pipelines.inputs import expand_inputs

    uris = expand_inputs([images])
    if not uris:
        raise SystemExit(f"demo: no images found in {images}")
    return uris


def _first_image(images: str) -> str:
    return _inputs(images)[0]


def write_deploy_config(path: Path, store: str, host: str, port: int) -> None:
    """A ready ``serve deploy`` file for this store (the repo's template with the store filled)."""
    import yaml

    config = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    config["http_options"] = {"host": host, "port": port}
    config["applications"][0]["args"]["store"] = store
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = args.store or str(workdir / "store")
    label_of, held_out = None, []
    started = time.perf_counter()

    if args.images:
        images = args.images
    else:
        from visual_search.demo_images import group_of, write_demo_images

        step("writing the default image set (scikit-image's photos + edits of each)")
        groups = write_demo_images(workdir / "images", workdir / "queries")
        images = str(workdir / "images")
        held_out = sorted((workdir / "queries").glob("*.jpg"))
        label_of = group_of
        print(
            f"{sum(map(len, groups.values()))} catalogue images of {len(groups)} photos "
            f"in {images}; {len(held_out)} held-out queries in {workdir / 'queries'}"
        )
    query = args.query or (
        str(workdir / "queries" / "chelsea_cat__query.jpg") if held_out else _first_image(images)
    )

    step(f"starting a local Ray on 127.0.0.1 (Serve mode: {args.serve_mode})")
    ray = start_ray(args.serve_mode, args.ray_temp_dir, args.num_cpus)
    stop_on_sigterm()
    try:
        step(f"embedding {images} into {store}")
        embed(images, store, args.num_shards)
        step("building the shard indexes")
        build_indexes(store)
        step(f"starting Serve on http://{args.host}:{args.port}")
        start_serve(store, args.host, args.port, thumbnail_roots_of(images))
        base_url = f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}"
        from serve.local import direct_ingress_port

        direct = direct_ingress_port()
        step("sample query")
        sample_query(base_url, query, args.k, label_of)
        if held_out:
            precision = held_out_precision(base_url, held_out, args.k)
            print(
                f"precision@{args.k} over {len(held_out)} held-out edits "
                f"(results from the query's own photo): {precision:.3f}"
            )
        deploy_file = workdir / "serve_config.yaml"
        write_deploy_config(deploy_file, store, args.host, args.port)
        query_path = Path(query).resolve() if Path(query).exists() else query
        print(f"\nready in {time.perf_counter() - started:.0f} s. Try:\n")
        print(f"  curl -s -F file=@{query_path} '{base_url}/search?k={args.k}'")
        print(f"  curl -s {base_url}/stats    # and {base_url}/docs for the API")
        if direct is not None:
            print(
                f"\n(the ingress replica also answers on its own port, with no proxy in between: "
                f"http://127.0.0.1:{direct}/search)"
            )
        print(f"\n(`serve deploy {deploy_file}` deploys the same app on a running cluster)")
        if args.exit:
            return 0
        print("\nserving; Ctrl-C to stop", flush=True)
        try:
            serve_forever()
        except KeyboardInterrupt:
            print("\nstopping")
        return 0
    finally:
        shutdown(ray)


if __name__ == "__main__":
    sys.exit(main())
